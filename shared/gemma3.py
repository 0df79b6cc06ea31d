"""Gemma 3：滑动窗口（局部）注意力与全局注意力交错、环形 KV 缓存、两个 RoPE 基数、(1 + w) 的 RMSNorm、每块四个归一化、
GeGLU、词嵌入乘 sqrt(d)；官方 270M 的配置与 Hugging Face 检查点读取，在 05_pretraining/bonus_gemma3 中讲解。"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf_checkpoint import find_hf_checkpoint
from .kv_cache import KVCache
from .llama import (LLAMA_LAYER_NAMES, FeedForward, GroupedQueryAttention, Llama3Model, RMSNorm, apply_rope,
                    compute_rope_params, hf_to_llama_name, load_llama)

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_gemma3.ipynb ----
class GemmaRMSNorm(RMSNorm):
    """Gemma 的 RMSNorm：x / sqrt(mean(x^2) + eps) * (1 + weight)，weight 初始化为 0；
    与 Llama 不同，在 float32 中乘完 (1 + weight) 之后才转回输入的类型（与 HF Gemma3RMSNorm 相同）。"""

    def __init__(self, emb_dim, eps=1e-6, dtype=None):
        super().__init__(emb_dim, eps=eps, dtype=dtype)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GeGLU(FeedForward):
    """GeGLU 前馈网络：fc3(gelu_tanh(fc1(x)) * fc2(x))；与 SwiGLU 只差门控的激活函数。"""

    def forward(self, x):
        return self.fc3(F.gelu(self.fc1(x), approximate="tanh") * self.fc2(x))


def sliding_window_mask(q_pos, k_pos, window=None):
    """布尔掩码 (len(q_pos), len(k_pos))，True 表示查询可以看见这个键。q_pos、k_pos 是绝对位置。
    因果：k <= q；window 不为 None 时还要 k > q - window（只看最近 window 个位置，含自己）；k_pos 为 -1 的空槽位永远看不见。"""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask


class SlidingWindowCache(KVCache):
    """Gemma 3 的 KV 缓存。全局层与 KVCache 相同（按位置存，容量 max_len）；局部层是 window 个槽位的环形缓冲区：
    位置 p 写进槽位 p % window（容量不超过 max_len），被覆盖的位置已在之后所有查询的窗口之外。
    update 返回该层可用的全部 K、V 与每个键的绝对位置（空槽位为 -1），掩码由位置算出。"""

    def __init__(self, layer_types, batch_size, n_heads, head_dim, max_len, context_length, window, device=None,
                 dtype=torch.float32):
        global_layers = [i for i, t in enumerate(layer_types) if t == "global"]
        local_layers = [i for i, t in enumerate(layer_types) if t == "local"]
        super().__init__(len(global_layers), batch_size, n_heads, head_dim, max_len, context_length, device, dtype)
        self.index = {layer: j for group in (global_layers, local_layers) for j, layer in enumerate(group)}
        self.is_local = [t == "local" for t in layer_types]
        self.slots = min(window, self.max_len)
        shape = (len(local_layers), batch_size, n_heads, self.slots, head_dim)
        # 用 0 而不是 empty：空槽位虽被掩码挡住，它的 V 仍以权重 0 参与乘法，未初始化内存里的 NaN 会污染结果
        self.ring_keys = torch.zeros(shape, device=device, dtype=dtype)
        self.ring_values = torch.zeros(shape, device=device, dtype=dtype)
        self.ring_pos = torch.full((len(local_layers), self.slots), -1, dtype=torch.long, device=device)

    def reset(self):
        super().reset()
        self.ring_pos.fill_(-1)

    def update(self, layer, k, v):
        """写入新 token 的 k、v (b, n_heads, T, head_dim)，返回 (keys, values, key_positions)。"""
        j, T = self.index[layer], k.shape[2]
        new_pos = torch.arange(self.pos, self.pos + T, device=k.device)
        if not self.is_local[layer]:
            keys, values = super().update(j, k, v)
            return keys, values, torch.arange(self.pos + T, device=k.device)
        keys = torch.cat([self.ring_keys[j], k], dim=2)  # 先拼起来：最早的新 token 可能还要看缓存里最老的位置
        values = torch.cat([self.ring_values[j], v], dim=2)
        positions = torch.cat([self.ring_pos[j], new_pos])
        keep = slice(max(0, T - self.slots), T)  # 只有最后 slots 个新 token 需要留到以后
        slot = new_pos[keep] % self.slots
        self.ring_keys[j][:, :, slot] = k[:, :, keep]
        self.ring_values[j][:, :, slot] = v[:, :, keep]
        self.ring_pos[j, slot] = new_pos[keep]
        return keys, values, positions

    def reorder(self, rows):
        super().reorder(rows)
        rows = torch.as_tensor(rows, device=self.ring_keys.device)
        self.ring_keys, self.ring_values = self.ring_keys[:, rows], self.ring_values[:, rows]


class SlidingWindowAttention(GroupedQueryAttention):
    """Gemma 3 的注意力：GQA + QK-norm（GemmaRMSNorm）+ 分数乘 query_pre_attn_scalar ** -0.5；
    window 为 None 是全局层，否则是只看最近 window 个位置的局部层。有缓存时 K、V 与它们的位置来自 cache.update。"""

    def __init__(self, cfg, window=None):
        super().__init__(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"], head_dim=cfg["head_dim"],
                         dtype=cfg.get("dtype"))
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=cfg["norm_eps"], dtype=cfg.get("dtype"))
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=cfg["norm_eps"], dtype=cfg.get("dtype"))
        self.window = window
        self.scale = cfg["query_pre_attn_scalar"] ** -0.5

    def forward(self, x, cos, sin, cache=None, layer=0):
        b, T, _ = x.shape
        q = self.q_norm(self.W_query(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.W_key(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2))
        v = self.W_value(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        start = 0 if cache is None else cache.pos
        q, k = apply_rope(q, cos, sin, start), apply_rope(k, cos, sin, start)
        q_pos = torch.arange(start, start + T, device=x.device)
        k_pos = q_pos
        if cache is not None:
            k, v, k_pos = cache.update(layer, k, v)
        k, v = k.repeat_interleave(self.group_size, dim=1), v.repeat_interleave(self.group_size, dim=1)
        mask = sliding_window_mask(q_pos, k_pos, self.window)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(context.transpose(1, 2).reshape(b, T, self.d_out))


class Gemma3Block(nn.Module):
    """Gemma 3 的 Transformer 块：注意力与前馈网络前后各一个 GemmaRMSNorm，x + post_norm(f(pre_norm(x)))。"""

    def __init__(self, cfg, layer_type):
        super().__init__()
        dtype, eps = cfg.get("dtype"), cfg["norm_eps"]
        self.layer_type = layer_type
        self.norm1 = GemmaRMSNorm(cfg["emb_dim"], eps=eps, dtype=dtype)
        self.att = SlidingWindowAttention(cfg, cfg["sliding_window"] if layer_type == "local" else None)
        self.post_att_norm = GemmaRMSNorm(cfg["emb_dim"], eps=eps, dtype=dtype)
        self.norm2 = GemmaRMSNorm(cfg["emb_dim"], eps=eps, dtype=dtype)
        self.ff = GeGLU(cfg)
        self.post_ff_norm = GemmaRMSNorm(cfg["emb_dim"], eps=eps, dtype=dtype)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.post_att_norm(self.att(self.norm1(x), cos, sin, cache, layer))
        return x + self.post_ff_norm(self.ff(self.norm2(x)))


def check_gemma3_config(cfg):
    """不合理的配置直接报错：layer_types 的长度与取值、窗口大小（1 ≤ sliding_window ≤ context_length）。"""
    layer_types = cfg["layer_types"]
    if len(layer_types) != cfg["n_layers"]:
        raise ValueError(f"layer_types 有 {len(layer_types)} 项，而 n_layers={cfg['n_layers']}")
    if set(layer_types) - {"local", "global"}:
        raise ValueError(f"layer_types 只能是 'local' 或 'global'，得到 {sorted(set(layer_types) - {'local', 'global'})}")
    if not 1 <= cfg["sliding_window"] <= cfg["context_length"]:
        raise ValueError(f"sliding_window={cfg['sliding_window']} 必须在 1 与 context_length={cfg['context_length']} "
                         "之间（窗口比上下文还长时，局部层就等于全局层）")


class Gemma3Model(nn.Module):
    """Gemma 3 结构的解码器语言模型：输入 token id (b, T)，输出 logits (b, T, vocab_size)。"""

    def __init__(self, cfg):
        super().__init__()
        check_gemma3_config(cfg)
        self.cfg = dict(cfg)
        dtype = cfg.get("dtype")
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=dtype)
        self.trf_blocks = nn.ModuleList([Gemma3Block(cfg, t) for t in cfg["layer_types"]])
        self.final_norm = GemmaRMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=dtype)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=dtype)
        if cfg.get("tie_embeddings", True):
            self.out_head.weight = self.tok_emb.weight
        self.apply(Llama3Model._init_weights)  # 线性层与嵌入 ~ N(0, 0.02²)；GemmaRMSNorm 的 weight 保持 0
        self.init_buffers()

    def init_buffers(self):
        """两套 RoPE 表：局部层用 rope_local_base，全局层用 rope_base（放在词嵌入所在的设备上；不进 state_dict）。"""
        cfg = self.cfg
        with torch.device(self.tok_emb.weight.device):
            for kind, base in [("local", cfg["rope_local_base"]), ("global", cfg["rope_base"])]:
                cos, sin = compute_rope_params(cfg["head_dim"], base, cfg["context_length"])
                self.register_buffer(f"cos_{kind}", cos, persistent=False)
                self.register_buffer(f"sin_{kind}", sin, persistent=False)

    def make_cache(self, batch_size=1, max_len=None):
        """全局层按位置存 max_len 个（默认且最大为 context_length），局部层只存最近 sliding_window 个。"""
        cfg, weight = self.cfg, self.tok_emb.weight
        return SlidingWindowCache(cfg["layer_types"], batch_size, cfg["n_kv_groups"], cfg["head_dim"], max_len,
                                  cfg["context_length"], cfg["sliding_window"], device=weight.device,
                                  dtype=weight.dtype)

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
        x = x * torch.tensor(self.cfg["emb_dim"] ** 0.5, dtype=x.dtype)  # 先转成 x 的类型再乘，与 HF 相同
        for layer, block in enumerate(self.trf_blocks):
            kind = block.layer_type
            x = block(x, getattr(self, f"cos_{kind}"), getattr(self, f"sin_{kind}"), cache, layer)
        if cache is not None:
            cache.pos += T
        return self.out_head(self.final_norm(x))


def _gemma3(vocab_size, emb_dim, n_layers, n_heads, n_kv_groups, hidden_dim, head_dim, sliding_window,
            context_length, local_per_global=5):
    """Gemma 3 各尺寸共同的设置：每 local_per_global 个局部层后一个全局层、RoPE 基数 1e4 / 1e6、共享词嵌入、bf16。"""
    layer_types = ["global" if (i + 1) % (local_per_global + 1) == 0 else "local" for i in range(n_layers)]
    return dict(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads,
                n_kv_groups=n_kv_groups, n_layers=n_layers, hidden_dim=hidden_dim, head_dim=head_dim,
                rope_base=1_000_000.0, rope_local_base=10_000.0, norm_eps=1e-6, query_pre_attn_scalar=head_dim,
                sliding_window=sliding_window, layer_types=layer_types, tie_embeddings=True, dtype=torch.bfloat16)


GEMMA3_CONFIGS = {  # 取自 google/gemma-3-<尺寸> 的 config.json
    "270M": _gemma3(262_144, 640, 18, 4, 1, 2048, 256, sliding_window=512, context_length=32_768),
}
GEMMA3_REPOS = {"270M": "google/gemma-3-270m"}  # 预设名 -> Hugging Face 仓库名


def kv_cache_bytes(cfg, seq_len, batch_size=1, bytes_per_value=2, n_kv_groups=None, window=None):
    """一批长度为 seq_len 的序列的 KV 缓存字节数：2 (K 与 V) × n_kv × head_dim × 字节 × Σ_层 min(seq_len, 该层窗口)。
    n_kv_groups 默认取 cfg 的值；cfg 有 layer_types 时局部层的窗口为 cfg["sliding_window"]，window 参数可以覆盖它。"""
    n_kv = n_kv_groups or cfg["n_kv_groups"]
    head_dim = cfg.get("head_dim") or cfg["emb_dim"] // cfg["n_heads"]
    window = window or cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or ["global"] * cfg["n_layers"]
    positions = sum(min(seq_len, window) if t == "local" else seq_len for t in layer_types)
    return 2 * n_kv * head_dim * bytes_per_value * positions * batch_size


GEMMA3_LAYER_NAMES = LLAMA_LAYER_NAMES | {  # 与 Llama 同名的归一化在 Gemma 里位置不同
    "post_attention_layernorm.weight": "post_att_norm.weight",
    "pre_feedforward_layernorm.weight": "norm2.weight",
    "post_feedforward_layernorm.weight": "post_ff_norm.weight",
}
_HF_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def hf_to_gemma3_name(hf_name):
    """HF Gemma 3 的张量名 -> Gemma3Model 的参数名；层外的名字（词嵌入、最后的归一化、lm_head）与 Llama 相同。"""
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in GEMMA3_LAYER_NAMES:
        return f"trf_blocks.{parts[2]}.{GEMMA3_LAYER_NAMES[parts[3]]}"
    return hf_to_llama_name(hf_name)


def _rope_base(hf_config, layer_type, old_key, default):
    """一种层的 RoPE 基数：transformers 5 的 rope_parameters[layer_type]，或旧写法的 rope_theta / rope_local_base_freq。"""
    rope = (hf_config.get("rope_parameters") or {}).get(layer_type) or {}
    if layer_type == "full_attention" and hf_config.get("rope_scaling"):
        rope = {**hf_config["rope_scaling"], **rope}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"不支持的 RoPE 缩放 {layer_type}: {rope}（只实现了 default）")
    return float(rope.get("rope_theta", hf_config.get(old_key, default)))


def gemma3_config_from_hf(hf_config):
    """把 HF 的 Gemma 3 文本模型 config.json（字典）换成 Gemma3Model 的配置；不支持的设置直接报错。"""
    if hf_config.get("model_type") != "gemma3_text":
        raise ValueError(f"model_type={hf_config.get('model_type')!r} 不是 Gemma 3 文本模型（应为 'gemma3_text'；"
                         "4B 以上的多模态检查点请读取其中的 text_config）")
    for key, expected in [("hidden_activation", "gelu_pytorch_tanh"), ("attention_bias", False),
                          ("attn_logit_softcapping", None), ("final_logit_softcapping", None),
                          ("use_bidirectional_attention", False)]:
        if hf_config.get(key, expected) != expected:
            raise ValueError(f"不支持的设置 {key}={hf_config[key]!r}（Gemma3Model 只实现了 {expected!r}）")
    n_layers = hf_config["num_hidden_layers"]
    hf_types = hf_config.get("layer_types") or [
        "full_attention" if (i + 1) % hf_config.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(n_layers)]
    if unknown := set(hf_types) - set(_HF_LAYER_TYPES):
        raise ValueError(f"不支持的层类型 {sorted(unknown)}（只支持 sliding_attention 与 full_attention）")
    return dict(vocab_size=hf_config["vocab_size"], context_length=hf_config["max_position_embeddings"],
                emb_dim=hf_config["hidden_size"], n_heads=hf_config["num_attention_heads"],
                n_kv_groups=hf_config["num_key_value_heads"], n_layers=n_layers,
                hidden_dim=hf_config["intermediate_size"], head_dim=hf_config["head_dim"],
                rope_base=_rope_base(hf_config, "full_attention", "rope_theta", 1_000_000.0),
                rope_local_base=_rope_base(hf_config, "sliding_attention", "rope_local_base_freq", 10_000.0),
                norm_eps=hf_config.get("rms_norm_eps", 1e-6), query_pre_attn_scalar=hf_config["query_pre_attn_scalar"],
                sliding_window=hf_config["sliding_window"], layer_types=[_HF_LAYER_TYPES[t] for t in hf_types],
                tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)), dtype=None)


def find_gemma3(name="270M", local_dir=None):
    """在本地找 Gemma 3 检查点（local_dir、HF 缓存、LLM_MIRROR 镜像、下载缓存）；name 是预设名或 HF 仓库名。找不到返回 None。"""
    return find_hf_checkpoint(GEMMA3_REPOS.get(name, name), local_dir)


def load_gemma3(folder, dtype=torch.float32, device="cpu"):
    """读取 HF 格式的 Gemma 3 文本模型检查点目录（单文件或分片），返回 (eval 模式的 Gemma3Model, cfg)。"""
    return load_llama(folder, dtype, device, Gemma3Model, gemma3_config_from_hf, hf_to_gemma3_name)
