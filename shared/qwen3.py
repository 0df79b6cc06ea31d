"""Qwen3：在 Llama 3 结构上加 QK 归一化与混合专家 (MoE) 前馈层；官方尺寸的预设配置与 Hugging Face 检查点读取，在 05_pretraining/bonus_qwen3 中讲解。"""
import re

import torch
import torch.nn as nn

from .hf_checkpoint import find_hf_checkpoint
from .llama import FeedForward, Llama3Model, hf_to_llama_name, llama_config_from_hf, load_llama
from .runtime import eval_mode

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_qwen3.ipynb ----
def _qwen3(emb_dim, hidden_dim, n_layers, n_heads, n_kv_groups, tie_embeddings, **moe):
    """Qwen3 各尺寸共同的设置：词表 151936、head_dim 128、RoPE 基数 1e6（不缩放）、RMSNorm eps 1e-6、QK-norm。"""
    return dict(vocab_size=151_936, context_length=40_960, emb_dim=emb_dim, n_heads=n_heads, n_kv_groups=n_kv_groups,
                n_layers=n_layers, hidden_dim=hidden_dim, head_dim=128, rope_base=1_000_000.0, rope_freq=None,
                norm_eps=1e-6, qk_norm=True, tie_embeddings=tie_embeddings, dtype=torch.bfloat16, **moe)


QWEN3_CONFIGS = {  # 取自 Qwen/Qwen3-<尺寸> 的 config.json
    "0.6B": _qwen3(1024, 3072, 28, 16, 8, tie_embeddings=True),
    "1.7B": _qwen3(2048, 6144, 28, 16, 8, tie_embeddings=True),
    "4B": _qwen3(2560, 9728, 36, 32, 8, tie_embeddings=True),
    "8B": _qwen3(4096, 12288, 36, 32, 8, tie_embeddings=False),
    "14B": _qwen3(5120, 17408, 40, 40, 8, tie_embeddings=False),
    "32B": _qwen3(5120, 25600, 64, 64, 8, tie_embeddings=False),
    "30B-A3B": _qwen3(2048, 6144, 48, 32, 4, tie_embeddings=False,
                      num_experts=128, num_experts_per_tok=8, moe_hidden_dim=768, norm_topk_prob=True),
    "235B-A22B": _qwen3(4096, 12288, 94, 64, 4, tie_embeddings=False,
                        num_experts=128, num_experts_per_tok=8, moe_hidden_dim=1536, norm_topk_prob=True),
}
QWEN3_REPOS = {name: f"Qwen/Qwen3-{name}" for name in QWEN3_CONFIGS}  # 预设名 -> Hugging Face 仓库名


class MoEFeedForward(nn.Module):
    """Qwen3-MoE 的前馈层：路由器 gate 为每个 token 选 top-k 个专家（SwiGLU），输出按路由权重加权求和。
    forward 之后：last_counts (num_experts,) 是每个专家分到的 token 数（不求导），
    aux_loss 是 Switch Transformer 式的负载均衡损失 E * sum_e f_e * P_e（均匀时为 1，可求导）。"""

    def __init__(self, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} 必须在 1 与 num_experts={self.num_experts} 之间")
        self.norm_topk_prob = cfg.get("norm_topk_prob", False)
        self.gate = nn.Linear(cfg["emb_dim"], self.num_experts, bias=False, dtype=cfg.get("dtype"))
        self.experts = nn.ModuleList([FeedForward(cfg, hidden_dim=cfg["moe_hidden_dim"])
                                      for _ in range(self.num_experts)])
        self.last_counts, self.aux_loss = None, None

    def route(self, x):
        """x (N, d) -> (概率 (N, E) float32, 选中专家的权重 (N, k), 选中的专家编号 (N, k))。"""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(x.dtype), experts

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x)
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)
        self.last_counts = counts.detach()
        f = counts.to(probs.dtype) / experts.numel()   # 每个专家分到的 (token, 槽位) 比例，不可导
        self.aux_loss = self.num_experts * (f * probs.mean(dim=0)).sum()
        out = torch.zeros_like(x)
        for e in counts.nonzero().flatten().tolist():  # 只算分到了 token 的专家
            token, slot = torch.where(experts == e)
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        return out.reshape(shape)


def is_moe_layer(cfg, layer_idx):
    """第 layer_idx 层是否用 MoE：有专家、不在 mlp_only_layers 中，且 (layer_idx+1) 是 decoder_sparse_step 的倍数。"""
    return (cfg.get("num_experts", 0) > 0 and layer_idx not in cfg.get("mlp_only_layers", ())
            and (layer_idx + 1) % cfg.get("decoder_sparse_step", 1) == 0)


class Qwen3Model(Llama3Model):
    """Qwen3（稠密与 MoE）：结构与 Llama3Model 相同（cfg["qk_norm"]=True），MoE 层的前馈网络换成 MoEFeedForward。"""

    def make_feed_forward(self, cfg, layer_idx):
        return MoEFeedForward(cfg) if is_moe_layer(cfg, layer_idx) else FeedForward(cfg)


def moe_layers(model):
    """模型里所有的 MoEFeedForward，按层的顺序。"""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def load_balancing_loss(model):
    """最近一次前向中各 MoE 层负载均衡损失的平均值（训练时乘以一个小系数加到交叉熵上）。"""
    return torch.stack([m.aux_loss for m in moe_layers(model)]).mean()


@torch.no_grad()
def expert_load(model, batches):
    """把 batches 中的每个输入 (b, T) 送进模型，返回每个 MoE 层每个专家被选中的次数，形状 (MoE 层数, num_experts)。"""
    layers = moe_layers(model)
    total = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.long)
    with eval_mode(model):
        for idx in batches:
            model(idx)
            total += torch.stack([m.last_counts.cpu() for m in layers])
    return total


def parameter_counts(model):
    """{"total", "embedding", "active"}：共享的张量只算一次；embedding 含不共享时的输出层；
    active 是每个 token 实际用到的参数（MoE 层只算 top-k 个专家）。"""
    total = sum(p.numel() for p in model.parameters())  # parameters() 对共享的参数只返回一次
    embedding = sum(w.numel() for w in {model.tok_emb.weight, model.out_head.weight})  # 共享时集合里只有一个
    idle = sum((m.num_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters()) for m in moe_layers(model))
    return dict(total=total, embedding=embedding, active=total - idle)


def preset_parameter_counts(cfg):
    """不建整个模型也能得到 parameter_counts：在 meta 设备上只建 1 层与 2 层的模型，差值就是一层的参数量。
    只在各层结构相同时成立（Qwen3 的所有预设都是如此）；否则退回到建整个模型。"""
    with torch.device("meta"):
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            return parameter_counts(Qwen3Model(cfg))
        one, two = (parameter_counts(Qwen3Model(dict(cfg, n_layers=n))) for n in (1, 2))
    return {key: one[key] + (cfg["n_layers"] - 1) * (two[key] - one[key]) for key in one}


def qwen3_config_from_hf(hf_config):
    """把 Hugging Face 的 Qwen3 / Qwen3-MoE config.json（字典）换成 Qwen3Model 的配置；不支持的设置直接报错。"""
    model_type = hf_config.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"model_type={model_type!r} 不是 Qwen3（应为 'qwen3' 或 'qwen3_moe'）")
    if hf_config.get("use_sliding_window", False):
        raise ValueError("不支持滑动窗口注意力 (use_sliding_window=true)")
    cfg = llama_config_from_hf(hf_config)
    cfg["qk_norm"] = True
    if model_type == "qwen3_moe":
        num_experts = hf_config.get("num_experts", hf_config.get("num_local_experts"))
        if not num_experts:
            raise ValueError("Qwen3-MoE 的配置里没有 num_experts（或 num_local_experts）")
        cfg.update(num_experts=num_experts, num_experts_per_tok=hf_config["num_experts_per_tok"],
                   moe_hidden_dim=hf_config["moe_intermediate_size"],
                   norm_topk_prob=bool(hf_config.get("norm_topk_prob", False)))
        step, dense_layers = hf_config.get("decoder_sparse_step", 1), list(hf_config.get("mlp_only_layers") or [])
        if step != 1 or dense_layers:  # 有的层不用 MoE：只在这种少见情况下才写进配置
            cfg.update(decoder_sparse_step=step, mlp_only_layers=dense_layers)
    return cfg


_EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_SWIGLU = {"gate": "fc1", "up": "fc2", "down": "fc3"}


def hf_to_qwen3_name(hf_name):
    """HF Qwen3 / Qwen3-MoE 的张量名 -> Qwen3Model 的参数名；MoE 之外的名字与 Llama 相同。"""
    if m := _EXPERT_NAME.fullmatch(hf_name):
        layer, expert, proj = m.groups()
        return f"trf_blocks.{layer}.ff.experts.{expert}.{_SWIGLU[proj]}.weight"
    if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.weight", hf_name):
        return f"trf_blocks.{m.group(1)}.ff.gate.weight"
    if re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)", hf_name):
        raise ValueError(f"张量 {hf_name!r} 是 transformers 内存里的合并格式；请用 save_pretrained 存盘的"
                         "逐专家格式（model.layers.i.mlp.experts.j.gate_proj.weight 等）")
    return hf_to_llama_name(hf_name)


def find_qwen3(name="0.6B", local_dir=None):
    """在本地找 Qwen3 检查点（local_dir、HF 缓存、LLM_MIRROR 镜像、下载缓存）；name 是预设名或 HF 仓库名。找不到返回 None。"""
    return find_hf_checkpoint(QWEN3_REPOS.get(name, name), local_dir)


def load_qwen3(folder, dtype=torch.float32, device="cpu"):
    """读取 HF 格式的 Qwen3 / Qwen3-MoE 检查点目录（单文件或分片），返回 (eval 模式的 Qwen3Model, cfg)。
    流程与 load_llama 完全相同（meta 设备 + 逐个张量读入），只换模型类、配置转换与张量名。"""
    return load_llama(folder, dtype, device, Qwen3Model, qwen3_config_from_hf, hf_to_qwen3_name)
