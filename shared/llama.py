"""Llama 3 / 3.2：RMSNorm、RoPE（含 Llama 3 频率缩放）、SwiGLU、分组查询注意力 (GQA)、支持 KV 缓存的 Llama3Model 与 Hugging Face 检查点读取，在 05_pretraining/bonus_gpt_to_llama 中讲解。"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf_checkpoint import load_hf_weights
from .kv_cache import KVCache

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_gpt_to_llama.ipynb ----
class RMSNorm(nn.Module):
    """均方根归一化：x / sqrt(mean(x^2) + eps) * weight；在 float32 中计算，再转回输入的类型（与 HF Llama 相同）。"""

    def __init__(self, emb_dim, eps=1e-5, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim, dtype=dtype))

    def forward(self, x):
        x32 = x.to(torch.float32)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU 前馈网络：fc3(silu(fc1(x)) * fc2(x))，没有偏置；fc1 = gate，fc2 = up，fc3 = down。
    隐藏层宽度默认为 cfg["hidden_dim"]；hidden_dim 参数可以覆盖它（例如 MoE 的专家更窄）。"""

    def __init__(self, cfg, hidden_dim=None):
        super().__init__()
        hidden = cfg["hidden_dim"] if hidden_dim is None else hidden_dim
        dtype = cfg.get("dtype")
        self.fc1 = nn.Linear(cfg["emb_dim"], hidden, bias=False, dtype=dtype)
        self.fc2 = nn.Linear(cfg["emb_dim"], hidden, bias=False, dtype=dtype)
        self.fc3 = nn.Linear(hidden, cfg["emb_dim"], bias=False, dtype=dtype)

    def forward(self, x):
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


def llama3_scale_frequencies(inv_freq, freq_config):
    """Llama 3 的 RoPE 频率缩放 (rope_type "llama3")：高频不变，低频除以 factor，中间平滑过渡。"""
    factor, old_len = freq_config["factor"], freq_config["original_context_length"]
    low, high = freq_config["low_freq_factor"], freq_config["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_rope_params(head_dim, theta_base=10_000.0, context_length=4096, freq_config=None, dtype=torch.float32):
    """RoPE 的 cos、sin 表，形状都是 (context_length, head_dim)，HF 的 rotate-half 布局（两半重复同样的角度）。
    freq_config：Llama 3 的频率缩放参数，None 表示不缩放。角度在 float32 中计算，最后转成 dtype。"""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} 必须是偶数（RoPE 把维度两两配对旋转）")
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_config is not None:
        inv_freq = llama3_scale_frequencies(inv_freq, freq_config)
    angles = (torch.arange(context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]).repeat(1, 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin, offset=0):
    """把 x (b, n_heads, T, head_dim) 的第 t 个位置旋转到绝对位置 offset + t。"""
    T, head_dim = x.shape[-2], x.shape[-1]
    if offset + T > cos.shape[0]:
        raise ValueError(f"位置 {offset + T - 1} 超出了 RoPE 表的长度 {cos.shape[0]}（context_length）")
    cos, sin = cos[offset:offset + T].to(x.dtype), sin[offset:offset + T].to(x.dtype)  # 与 HF 相同：先转成 x 的类型
    x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class GroupedQueryAttention(nn.Module):
    """分组查询注意力：num_heads 个查询头，每 num_heads // num_kv_groups 个共享一组 K、V；因果；q、k 经过 RoPE。
    x (b, T, d_in)；有缓存时 x 只含新 token，位置从 cache.pos 开始，旋转后的 K、V 写入缓存（cache.pos 由模型前移）。"""

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, norm_eps=1e-6, dtype=None):
        super().__init__()
        if num_heads % num_kv_groups != 0:
            raise ValueError(f"num_heads ({num_heads}) 必须能被 num_kv_groups ({num_kv_groups}) 整除")
        if head_dim is None:
            if d_in % num_heads != 0:
                raise ValueError(f"d_in ({d_in}) 不能被 num_heads ({num_heads}) 整除，请显式给出 head_dim")
            head_dim = d_in // num_heads
        self.num_heads, self.num_kv_groups, self.head_dim = num_heads, num_kv_groups, head_dim
        self.group_size = num_heads // num_kv_groups
        self.d_out = num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype) if qk_norm else None

    def forward(self, x, cos, sin, cache=None, layer=0):
        b, T, _ = x.shape
        q = self.W_query(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = 0 if cache is None else cache.pos
        q, k = apply_rope(q, cos, sin, start), apply_rope(k, cos, sin, start)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # 每组 K、V 复制给组内的 group_size 个查询头：(b, n_kv, S, d_h) -> (b, n_heads, S, d_h)
        k, v = k.repeat_interleave(self.group_size, dim=1), v.repeat_interleave(self.group_size, dim=1)
        if start == 0 or T == 1:  # 从头算：普通的因果注意力；只有一个新 token：它能看见全部缓存
            context = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0)
        else:  # 分块送入：新 token i（绝对位置 start+i）看见位置 0..start+i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(context.transpose(1, 2).reshape(b, T, self.d_out))


class TransformerBlock(nn.Module):
    """Llama 的 Transformer 块：x + Attn(RMSNorm(x))，再 x + FF(RMSNorm(x))；ff 默认是 SwiGLU FeedForward。"""

    def __init__(self, cfg, ff=None):
        super().__init__()
        dtype = cfg.get("dtype")
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=dtype)
        self.att = GroupedQueryAttention(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"],
                                         head_dim=cfg.get("head_dim"), qk_norm=cfg.get("qk_norm", False),
                                         norm_eps=cfg["norm_eps"], dtype=dtype)
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=dtype)
        self.ff = FeedForward(cfg) if ff is None else ff

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.att(self.norm1(x), cos, sin, cache, layer)
        return x + self.ff(self.norm2(x))


class Llama3Model(nn.Module):
    """Llama 3 结构的解码器语言模型：输入 token id (b, T)，输出 logits (b, T, vocab_size)。"""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        dtype = cfg.get("dtype")
        self.head_dim = cfg.get("head_dim") or cfg["emb_dim"] // cfg["n_heads"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=dtype)
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg, ff=self.make_feed_forward(cfg, i))
                                         for i in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=dtype)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=dtype)
        if cfg.get("tie_embeddings", False):
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)  # 在 meta 设备上构建时，这一步不做任何计算
        self.init_buffers()

    @staticmethod
    def _init_weights(module):
        """与 HF Llama 相同的初始化：线性层与嵌入 ~ N(0, 0.02²)，RMSNorm 的 weight 为 1。"""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def make_feed_forward(self, cfg, layer_idx):
        """第 layer_idx 层的前馈网络；子类（如 Qwen3-MoE）可以重写。"""
        return FeedForward(cfg)

    def init_buffers(self):
        """按配置重新计算 RoPE 的 cos、sin 表（放在词嵌入所在的设备上；不进 state_dict）。"""
        with torch.device(self.tok_emb.weight.device):
            cos, sin = compute_rope_params(self.head_dim, self.cfg["rope_base"], self.cfg["context_length"],
                                           self.cfg.get("rope_freq"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def make_cache(self, batch_size=1, max_len=None):
        """按本模型的形状建 KV 缓存：n_kv_groups 个头，max_len 默认且最大为 context_length。"""
        cfg, weight = self.cfg, self.tok_emb.weight
        return KVCache(cfg["n_layers"], batch_size, cfg["n_kv_groups"], self.head_dim, max_len, cfg["context_length"],
                       device=weight.device, dtype=weight.dtype)

    def forward(self, in_idx, cache=None):
        """有缓存时 in_idx 只含新 token，位置从 cache.pos 开始。"""
        b, T = in_idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg["context_length"]:
            raise ValueError(f"序列长度 {start + T}（缓存中 {start} 个 + 新输入 {T} 个）超过上下文长度 "
                             f"context_length={self.cfg['context_length']}；请截断输入")
        if cache is not None:
            cache.check_room(b, T)
        x = self.tok_emb(in_idx)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, self.cos, self.sin, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.out_head(self.final_norm(x))


def _llama32(emb_dim, n_heads, n_layers, head_dim):
    """Llama 3.2 各尺寸共同的设置（取自 meta-llama/Llama-3.2-1B 与 Llama-3.2-3B 的 config.json）。"""
    return dict(vocab_size=128_256, context_length=131_072, emb_dim=emb_dim, n_heads=n_heads, n_kv_groups=8,
                n_layers=n_layers, hidden_dim=8192, head_dim=head_dim, rope_base=500_000.0, norm_eps=1e-5,
                qk_norm=False, tie_embeddings=True, dtype=torch.bfloat16,
                rope_freq=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=8192))


LLAMA32_CONFIGS = {"1B": _llama32(2048, 32, 16, 64), "3B": _llama32(3072, 24, 28, 128)}


LLAMA_LAYER_NAMES = {  # HF 的 model.layers.{i}.<名字> -> 我们的 trf_blocks.{i}.<名字>；q_norm、k_norm 只有 Qwen3 等才有
    "input_layernorm.weight": "norm1.weight", "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.q_proj.weight": "att.W_query.weight", "self_attn.k_proj.weight": "att.W_key.weight",
    "self_attn.v_proj.weight": "att.W_value.weight", "self_attn.o_proj.weight": "att.out_proj.weight",
    "self_attn.q_norm.weight": "att.q_norm.weight", "self_attn.k_norm.weight": "att.k_norm.weight",
    "mlp.gate_proj.weight": "ff.fc1.weight", "mlp.up_proj.weight": "ff.fc2.weight",
    "mlp.down_proj.weight": "ff.fc3.weight",
}


def hf_to_llama_name(hf_name):
    """HF Llama 的张量名 -> Llama3Model 的参数名；旧检查点里的 rotary_emb.inv_freq 返回 None（跳过）。"""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    top = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.weight",
           "lm_head.weight": "out_head.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LLAMA_LAYER_NAMES:
        return f"trf_blocks.{parts[2]}.{LLAMA_LAYER_NAMES[parts[3]]}"
    return hf_name  # 未知的名字原样返回，load_hf_weights 会报“模型里没有这个参数”


def llama_config_from_hf(hf_config):
    """把 HF 的 Llama config.json（字典）换成 Llama3Model 的配置；遇到不支持的设置直接报错。
    RoPE 的设置接受 transformers 5 的 rope_parameters，也接受旧的 rope_theta + rope_scaling。"""
    for key, expected in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]:
        if hf_config.get(key, expected) != expected:
            raise ValueError(f"不支持的设置 {key}={hf_config[key]!r}（Llama3Model 对应 {expected!r}）")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_base = float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"不支持的 RoPE 缩放 rope_type={rope_type!r}（只实现了 default 与 llama3）")
    rope_freq = None if rope_type == "default" else dict(
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
        original_context_length=rope["original_max_position_embeddings"])
    n_heads = hf_config["num_attention_heads"]
    return dict(vocab_size=hf_config["vocab_size"], context_length=hf_config["max_position_embeddings"],
                emb_dim=hf_config["hidden_size"], n_heads=n_heads,
                n_kv_groups=hf_config.get("num_key_value_heads") or n_heads, n_layers=hf_config["num_hidden_layers"],
                hidden_dim=hf_config["intermediate_size"],
                head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // n_heads,
                rope_base=rope_base, rope_freq=rope_freq, norm_eps=hf_config.get("rms_norm_eps", 1e-6), qk_norm=False,
                tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)), dtype=None)


def load_llama(folder, dtype=torch.float32, device="cpu", model_cls=Llama3Model, config_from_hf=llama_config_from_hf,
               rename=hf_to_llama_name):
    """读取 HF 格式的 Llama 检查点目录（config.json + safetensors），返回 (eval 模式的 Llama3Model, cfg)。
    模型先在 meta 设备上构建、再逐个张量读入（峰值内存约一份模型）；Qwen3 等结构相同的模型换掉 model_cls、config_from_hf、rename 即可复用。"""
    folder = Path(folder)
    cfg = config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    cfg["dtype"] = dtype
    with torch.device("meta"):
        model = model_cls(cfg)
    load_hf_weights(model, folder, rename, dtype=dtype, device=device)
    return model.eval(), cfg
