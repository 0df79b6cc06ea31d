"""训练速度与内存（每 token 的 FLOPs 与参数量公式在 shared.model）：交替测速的训练器、融合的 LayerNorm/GELU、梯度检查点、保存的激活与内存规划器，
在 05_pretraining/bonus_training_speed 中讲解。"""
import functools
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .model import GELU, GPTModel, LayerNorm, count_params_formula
from .runtime import GPU_MEMORY_ENV, REPO_ROOT, gpu_memory_override
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


def plan_memory(cfg, batch_size, seq_len, *, amp=False, checkpointing=False, params=None):
    """一个训练步（AdamW，不编译）的峰值内存估计，单位字节；返回各部分与合计 total。

    激活按每层每 token 保存 32·d 个 fp32 数，手写注意力再加 B·H·T² 个 softmax 输出（sdpa 配置没有）；
    checkpointing 时每层只存输入、反向时一次重算一层；输出层峰值约 3·N·V 个数；amp 多一份 bf16 权重。
    params：参数量，默认按 GPT 的公式从 cfg 算（其他结构的模型传入实际的参数量）。
    """
    d, L, H, V = cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"], cfg["vocab_size"]
    n_tok, params = batch_size * seq_len, count_params_formula(cfg) if params is None else params
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


def recommend_micro_batch(cfg, seq_len, budget_bytes, effective_batch, seqs=1, **plan_options):
    """不超过内存预算的最大微批次（整除 effective_batch），返回 (微批次, 梯度累加步数, 计划)；放不下返回 None。
    seqs：每条样本有几个序列（DPO 的 chosen 与 rejected 是 2 个）。"""
    for accum in (k for k in range(1, effective_batch + 1) if effective_batch % k == 0):
        plan = plan_memory(cfg, effective_batch // accum * seqs, seq_len, **plan_options)
        if plan["total"] <= budget_bytes:
            return effective_batch // accum, accum, plan
    return None


# 在子进程里运行的脚本：训练两步，打印这期间常驻内存峰值的增量（字节）
PEAK_SCRIPT = """
import json, re, resource, sys, torch
from shared.model import GPTModel
from shared.perf import set_checkpointing
from shared.train import calc_loss_batch, configure_optimizer


def rss(field):  # Linux：/proc/self/status 里的 VmRSS（当前）与 VmHWM（峰值），单位 kB
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


cfg, batch, seq_len, ckpt = json.loads(sys.argv[1])
x = torch.randint(0, cfg["vocab_size"], (batch, seq_len))
linux = sys.platform.startswith("linux")
if linux:
    open("/proc/self/clear_refs", "w").write("5")  # 把峰值重置为当前值：导入 torch 时的瞬时峰值不算
    before = rss("VmRSS")
else:  # macOS：只有进程至今的峰值 ru_maxrss（单位字节），导入时的峰值会混进来，结果偏粗
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = set_checkpointing(GPTModel(cfg), ckpt)
optimizer = configure_optimizer(model, lr=1e-4)
for _ in range(2):
    optimizer.zero_grad(set_to_none=True)
    calc_loss_batch(x, x, model, "cpu").backward()
    optimizer.step()
print((rss("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - before)
"""


def measure_peak_rss(cfg, batch_size, seq_len, checkpointing=False):
    """CPU 上一个训练步的实测峰值内存（字节）：在新的子进程里训练两步，读操作系统记录的峰值常驻内存减去建模型之前的；
    Windows 上测不了，返回 None。"""
    if sys.platform == "win32":
        return None
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps([cfg, batch_size, seq_len, checkpointing])],
                         capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    return int(out.stdout)


def gpu_memory_budget(device):
    """训练能用的显存：返回 (预算, 此刻已占用) 字节数；不是 CUDA 设备时返回 None。
    预算取环境变量 LLM_GPU_MEMORY_GB（GiB），未设置时为空闲显存加上 PyTorch 已缓存、可复用的部分。"""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    budget = gpu_memory_override()
    if budget is None:
        budget = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    return budget, torch.cuda.memory_allocated(device)


def tensors_in(batch):
    """批次（张量，或由它们组成的元组、列表、字典）里的全部张量。"""
    if torch.is_tensor(batch):
        return [batch]
    items = batch.values() if isinstance(batch, dict) else batch
    return [t for item in items for t in tensors_in(item)]


def batch_shape(batch):
    """(条数, 每条的序列数, 最长序列长度)：成对的 (输入, 目标) 二维整数张量算一条序列，DPO 的 chosen/rejected 算两条。"""
    seqs = [t for t in tensors_in(batch) if t.dim() == 2 and not t.is_floating_point()]
    if not seqs:
        raise ValueError("批次里没有 (条数, 序列长度) 形状的整数张量，无法规划显存")
    return seqs[0].shape[0], max(1, len(seqs) // 2), max(t.shape[1] for t in seqs)


def split_batch(batch, chunks):
    """把批次沿第 0 维切成 chunks 份条数相同的小批次（chunks 须整除条数）。"""
    if torch.is_tensor(batch):
        return list(batch.chunk(chunks))
    if isinstance(batch, dict):
        parts = {key: split_batch(value, chunks) for key, value in batch.items()}
        return [dict(zip(parts, values)) for values in zip(*parts.values())]
    return [type(batch)(values) for values in zip(*(split_batch(item, chunks) for item in batch))]


def plan_split(cfg, params, batch, budget, held, amp=False):
    """最小的切分份数 k（整除条数），使 已占用 − 4·参数量（已在规划里的 fp32 权重）+ 规划峰值 ≤ 预算；返回 (k, 规划)。"""
    rows, seqs, seq_len = batch_shape(batch)
    room = budget - held + 4 * params  # 留给这一步规划的字节数
    answer = recommend_micro_batch(cfg, seq_len, room, rows, seqs, amp=amp, params=params)
    if answer is not None:
        return answer[1], answer[2]
    need = held - 4 * params + plan_memory(cfg, seqs, seq_len, amp=amp, params=params)["total"]
    raise MemoryError(
        f"显存不够：每次只算 1 条（{seqs} 条长 {seq_len} 的序列），这一步也要约 {need / 2**30:.1f} GiB，"
        f"而可用的只有 {budget / 2**30:.1f} GiB（模型 {params / 1e6:.0f}M 参数）。"
        f"请在笔记本的 SETTINGS 里减小序列长度（max_length / context_length）或换小一些的模型，"
        f"或打开梯度检查点（shared.perf.set_checkpointing）；显存其实更多时，设置环境变量 {GPU_MEMORY_ENV}（单位 GiB）")


def memory_fitter(model, amp=False):
    """CUDA 上返回 split(batch)：按规划器把放不下的批次切成几份（train_step 在份之间累加梯度，有效批次不变），
    1 条也放不下时抛出 MemoryError；不在 CUDA 上、或模型的 cfg 没有规划器要的尺寸时返回 None（什么也不做）。"""
    core = getattr(model, "module", getattr(model, "_orig_mod", model))  # DDP 与 torch.compile 的包装
    cfg = getattr(core, "cfg", {})
    memory = gpu_memory_budget(next(core.parameters()).device)
    if memory is None or not all(key in cfg for key in ("emb_dim", "n_layers", "n_heads", "vocab_size")):
        return None
    params, told = sum(p.numel() for p in core.parameters()), set()

    def split(batch):
        chunks, plan = plan_split(cfg, params, batch, *memory, amp=amp)
        if chunks > 1 and chunks not in told:
            told.add(chunks)
            print(f"显存预算 {memory[0] / 2**30:.1f} GiB：批次切成 {chunks} 份逐份累加梯度（有效批次不变），"
                  f"规划峰值 {plan['total'] / 2**30:.1f} GiB")
        return split_batch(batch, chunks)
    return split
