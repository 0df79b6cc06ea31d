"""训练速度与内存（每 token 的 FLOPs 与参数量公式在 shared.model）：交替测速的训练器、融合的 LayerNorm/GELU、梯度检查点、保存的激活与内存规划器，
在 05_pretraining/bonus_training_speed 中讲解。"""
import functools
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .model import GELU, GPTModel, LayerNorm, count_params_formula
from .train import autocast, calc_loss_batch, configure_optimizer, endless_batches, token_loader, train_step

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_training_speed.ipynb ----
def make_trainer(cfg, batch_size, seq_len, token_ids, *, device="cpu", amp_dtype=None, compile=False, fused=False,
                 fused_ops=False, threads=None, checkpointing=False, seed=0):
    """建好模型、AdamW 与数据，返回 run(steps) -> 每秒训练的 token 数（threads 给定时 run 先设好线程数）。

    第一次 run 包含 torch.compile 的编译时间，所以先跑几步预热再计时；fused_ops 见第 3 节，checkpointing 见第 4 节。
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = set_checkpointing(GPTModel(cfg).to(device), checkpointing)
    if fused_ops:
        use_fused_ops(model)
    optimizer = configure_optimizer(model, lr=1e-4, fused=fused)
    target = torch.compile(model) if compile else model
    batches = endless_batches(token_loader(token_ids, batch_size, seq_len, stride=seq_len, seed=seed))
    amp = autocast(device, amp_dtype)

    def loss_fn(batch):
        return calc_loss_batch(*batch, target, device)

    def run(steps):
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(target, optimizer, batches, loss_fn, amp=amp)  # 里面的 loss.item() 会等 GPU 算完
        return steps * batch_size * seq_len / (time.perf_counter() - start)

    return run


def use_fused_ops(model):
    """把第 4 章手写的 LayerNorm（8 个算子）与 GELU（7 个算子）的 forward 各换成 PyTorch 的一个融合算子。

    数学上相同（第 4 章已与 nn.LayerNorm、nn.GELU(approximate="tanh") 核对）；只替换实例的 forward，参数名不变，
    训练与推理都能用。
    """
    for module in model.modules():
        if isinstance(module, LayerNorm):
            module.forward = functools.partial(_fused_layer_norm, module)
        elif isinstance(module, GELU):
            module.forward = functools.partial(F.gelu, approximate="tanh")
    return model


def _fused_layer_norm(norm, x):
    return F.layer_norm(x, norm.scale.shape, norm.scale, norm.shift, norm.eps)


def set_checkpointing(model, enabled=True):
    """让 GPTModel 的每个 Transformer 块用梯度检查点（第 4 节）：前向只保存块的输入，反向时重算块内的激活。

    只替换实例的 forward，参数名与 state_dict 不变；enabled=False 恢复原样。
    """
    for block in model.trf_blocks:
        if enabled:
            block.forward = functools.partial(checkpoint, type(block).forward, block, use_reentrant=False)
        else:
            block.__dict__.pop("forward", None)
    return model


def alternate(runners, rounds, steps, warmup=1):
    """几个 run 先各预热 warmup 步，再轮流各跑 steps 步、共 rounds 轮；返回 {名字: 每轮的 tokens/s}。

    轮流测量让机器负载的起伏平均地落在每个配置上，比先测完一个再测另一个公平。
    """
    for run in runners.values():
        run(warmup)
    speeds = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            speeds[name].append(run(steps))
    return speeds


def saved_activation_bytes(model, batch_size, seq_len, device="cpu"):
    """一次前向 + 损失为反向保存的激活（按存储去重，不含参数本身），单位字节。"""
    x = torch.randint(0, model.cfg["vocab_size"], (batch_size, seq_len), device=device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        calc_loss_batch(x, x, model, device)
    return sum(saved.values())


def plan_memory(cfg, batch_size, seq_len, *, amp=False, checkpointing=False):
    """一个训练步（AdamW，不编译）的峰值内存估计，单位字节；返回各部分与合计 total。

    激活按每层每 token 保存 32·d 个 fp32 数，手写注意力再加 B·H·T² 个 softmax 输出（sdpa 配置没有）；
    checkpointing 时每层只存输入、反向时一次重算一层；输出层峰值约 3·N·V 个数；amp 多一份 bf16 权重。
    """
    d, L, H, V = cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"], cfg["vocab_size"]
    n_tok, params = batch_size * seq_len, count_params_formula(cfg)
    layer = 32 * n_tok * d + (0 if cfg.get("sdpa") else batch_size * H * seq_len**2)
    plan = {
        "weights": params * (6 if amp else 4),
        "gradients": params * 4,
        "adam_state": params * 8,
        "activations": 4 * ((n_tok * d if checkpointing else layer) * L + 4 * n_tok * d),
        "recompute": 4 * layer if checkpointing else 0,  # 检查点：反向传播时正在重算的那一块
        "logits": 4 * 3 * n_tok * V,
    }
    return dict(plan, total=sum(plan.values()))


def plan_generation_memory(cfg, batch_size, max_len, bytes_per_value=4):
    """生成时的内存：权重加上 KV 缓存（每层 K、V 各 batch × max_len × d 个数），单位字节。"""
    kv_cache = 2 * cfg["n_layers"] * batch_size * max_len * cfg["emb_dim"] * bytes_per_value
    return {"weights": count_params_formula(cfg) * bytes_per_value, "kv_cache": kv_cache,
            "total": count_params_formula(cfg) * bytes_per_value + kv_cache}


def recommend_micro_batch(cfg, seq_len, budget_bytes, effective_batch, **plan_options):
    """不超过内存预算的最大微批次（2 的幂，且整除 effective_batch），返回 (微批次, 梯度累加步数, 计划)；放不下返回 None。"""
    micro = effective_batch
    while micro >= 1:
        plan = plan_memory(cfg, micro, seq_len, **plan_options)
        if effective_batch % micro == 0 and plan["total"] <= budget_bytes:
            return micro, effective_batch // micro, plan
        micro //= 2
    return None
