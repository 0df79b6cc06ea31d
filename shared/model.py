"""GPT 模型：配置预设、LayerNorm、GELU、前馈网络、Transformer 块、GPTModel 与贪心生成，在 04_gpt_model 中讲解。"""
import math

import torch
import torch.nn as nn

from .attention import MultiHeadAttention
from .kv_cache import KVCache, forward_cached
from .runtime import get_profile

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 04_gpt_model/01_gpt_model.ipynb ----
GPT_CONFIGS = {
    # GPT-2 官方四种尺寸（词表 50257，上下文 1024，QKV 带偏置）
    "gpt2-small (124M)": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium (355M)": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large (774M)": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl (1558M)": dict(emb_dim=1600, n_layers=48, n_heads=25),
}
GPT2_BASE = dict(vocab_size=50257, context_length=1024, drop_rate=0.0, qkv_bias=True, tie_weights=True)

COURSE_CONFIGS = {
    # 本课程的小模型：tiny 供 CI 秒级运行，cpu 供 2 核笔记本电脑几分钟内训练出有意义的结果
    "tiny": dict(GPT2_BASE, context_length=64, emb_dim=64, n_layers=2, n_heads=2, qkv_bias=False),
    "cpu": dict(GPT2_BASE, context_length=256, emb_dim=192, n_layers=4, n_heads=4, qkv_bias=False),
}


def model_config(name):
    """按名字返回配置字典的副本：GPT-2 四种尺寸，或课程的 "tiny" / "cpu"。"""
    if name in GPT_CONFIGS:
        return dict(GPT2_BASE, **GPT_CONFIGS[name])
    if name in COURSE_CONFIGS:
        return dict(COURSE_CONFIGS[name])
    raise ValueError(f"未知的模型配置 {name!r}；可选：{', '.join([*GPT_CONFIGS, *COURSE_CONFIGS])}")


def config_for_profile(profile=None):
    """配置档（默认为当前配置档）对应的模型：tiny -> "tiny"，cpu -> "cpu"，gpu -> GPT-2 124M。"""
    return model_config({"tiny": "tiny", "cpu": "cpu", "gpu": "gpt2-small (124M)"}[get_profile(profile)])


class LayerNorm(nn.Module):
    """对最后一维做均值 0、方差 1 的归一化，再乘可学习的 scale、加 shift。"""

    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GELU 的 tanh 近似（GPT-2 使用的版本）。"""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class FeedForward(nn.Module):
    """逐位置的两层 MLP：emb_dim -> 4*emb_dim -> emb_dim。"""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LN 结构：x + Attn(LN(x))，再 x + FF(LN(x))。"""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"],
            use_sdpa=cfg.get("sdpa", False),
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2 结构的解码器语言模型，输入 token id (b, T)，输出 logits (b, T, vocab_size)。"""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        pad = cfg.get("pad_vocab_to") or 1
        n_rows = -(-cfg["vocab_size"] // pad) * pad  # 词表行数向上补齐到 pad 的倍数（提速开关，默认不补）
        self.tok_emb = nn.Embedding(n_rows, cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], n_rows, bias=False)
        if cfg.get("tie_weights", True):
            self.out_head.weight = self.tok_emb.weight  # 权重共享 (weight tying)
        self.apply(self._init_weights)
        # 残差分支的输出投影再缩小 1/sqrt(2*n_layers)，让残差流的方差不随层数增长
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, in_idx, cache=None, keep=None):
        """keep（与 in_idx 同形状的布尔张量）给定时，只在 keep 为 True 的位置算输出层，返回 (keep.sum(), vocab_size)。"""
        if cache is not None:  # 带 KV 缓存的增量计算：in_idx 只含新 token（选读笔记本 bonus_kv_cache）
            return forward_cached(self, in_idx, cache)
        b, seq_len = in_idx.shape
        if seq_len > self.cfg["context_length"]:
            raise ValueError(
                f"输入长度 {seq_len} 超过上下文长度 context_length={self.cfg['context_length']}；"
                "请先截断到最后 context_length 个 token"
            )
        pos = torch.arange(seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        x = self.trf_blocks(x)
        if keep is not None:
            x = x[keep]
        return self.lm_head(x)

    def lm_head(self, x):
        """最后的 LayerNorm 与输出层；补齐的词表行不是真实 token，它们的 logits 在这里切掉，损失与采样都看不到。"""
        return self.out_head(self.final_norm(x))[..., :self.cfg["vocab_size"]]

    def make_cache(self, batch_size=1, max_len=None):
        """建一个装得下 max_len 个 token（默认 context_length）的 KV 缓存，供 forward(…, cache=…) 使用。"""
        cfg, weight = self.cfg, self.tok_emb.weight
        return KVCache(cfg["n_layers"], batch_size, cfg["n_heads"], cfg["emb_dim"] // cfg["n_heads"], max_len,
                       cfg["context_length"], device=weight.device, dtype=weight.dtype)


def count_params_formula(cfg):
    """按上表公式计算 GPTModel 的参数量（不实例化模型）；词表按 pad_vocab_to 补齐后的行数算。"""
    C, d, L = cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    pad = cfg.get("pad_vocab_to") or 1
    V = -(-cfg["vocab_size"] // pad) * pad
    per_block = 12 * d * d + 10 * d + (3 * d if cfg["qkv_bias"] else 0)
    head = 0 if cfg.get("tie_weights", True) else V * d
    return V * d + C * d + L * per_block + 2 * d + head


def count_params(model):
    """实际参数量；共享的权重只被 parameters() 返回一次，所以只计一次。"""
    return sum(p.numel() for p in model.parameters())


def train_flops_per_token(cfg, seq_len):
    """训练一个 token 的浮点运算数（前向 + 反向）：6 × 参与矩阵乘法的参数量 + 注意力的 12·L·T·d。"""
    d, L, V = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    return 6 * (12 * L * d * d + V * d) + 12 * L * seq_len * d


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """贪心解码：每步取概率最大的 token。输入超过 context_size 时只保留最后 context_size 个 token。"""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
