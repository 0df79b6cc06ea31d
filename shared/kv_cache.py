"""KV 缓存 (KV cache)：让 GPTModel 逐 token 生成时不再重复计算前文的 K、V，在 04_gpt_model/bonus_kv_cache 中讲解。

不修改 GPTModel，也不复制权重：这里的函数直接调用模型自己的子模块（tok_emb、att.W_query、ff……），
只把注意力这一步换成“新 token 的 Q 对缓存中全部 K、V”的计算。
"""
import torch
import torch.nn.functional as F

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 04_gpt_model/bonus_kv_cache.ipynb ----
class KVCache:
    """预分配的 K/V 缓存：形状 (n_layers, batch, n_heads, max_len, head_dim)，按位置写入，从不拼接。"""

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, device=None, dtype=torch.float32):
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # 已缓存的 token 数 = 下一个 token 的位置编号

    @classmethod
    def for_model(cls, model, batch_size=1, max_len=None):
        """按模型的配置建缓存；max_len 默认且最大为 context_length（位置嵌入只有这么多行）。"""
        cfg = model.cfg
        max_len = cfg["context_length"] if max_len is None else max_len
        if not 1 <= max_len <= cfg["context_length"]:
            raise ValueError(f"max_len={max_len} 必须在 1 与 context_length={cfg['context_length']} 之间")
        weight = model.tok_emb.weight
        return cls(cfg["n_layers"], batch_size, cfg["n_heads"], cfg["emb_dim"] // cfg["n_heads"], max_len,
                   device=weight.device, dtype=weight.dtype)

    def reset(self):
        """换一个新的提示词之前调用：旧内容不必清零，pos 归零后会被覆盖。"""
        self.pos = 0

    def check_room(self, batch_size, num_new):
        """写入前检查批大小与剩余容量，不满足时报错（此时缓存保持不变）。"""
        if batch_size != self.batch_size:
            raise ValueError(f"输入的批大小 {batch_size} 与缓存的批大小 {self.batch_size} 不同")
        if self.pos + num_new > self.max_len:
            raise RuntimeError(
                f"KV 缓存已满：已缓存 {self.pos} 个 token，再写入 {num_new} 个会超过容量 max_len={self.max_len}。"
                "新提示词请先 reset()；需要更长的序列请建更大的缓存（最大为 context_length）"
            )

    def update(self, layer, k, v):
        """把新 token 的 k、v (b, n_heads, T, head_dim) 写入位置 [pos, pos+T)，返回该层至今全部的 K、V（视图）。"""
        end = self.pos + k.shape[2]
        self.keys[layer, :, :, self.pos:end] = k
        self.values[layer, :, :, self.pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def attention_cached(att, x, cache, layer):
    """用 MultiHeadAttention 模块 att 的权重处理新 token x (b, T, d)：Q 只算新 token，K、V 来自缓存。"""
    b, T, _ = x.shape
    q = att.W_query(x).view(b, T, att.num_heads, att.head_dim).transpose(1, 2)
    k = att.W_key(x).view(b, T, att.num_heads, att.head_dim).transpose(1, 2)
    v = att.W_value(x).view(b, T, att.num_heads, att.head_dim).transpose(1, 2)
    keys, values = cache.update(layer, k, v)
    start = cache.pos
    # 新 token i（绝对位置 start+i）可以看见位置 0..start+i；单个新 token 可以看见全部缓存，不需要掩码
    mask = None if T == 1 else ~att.mask[start:start + T, :start + T]
    context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             dropout_p=att.dropout.p if att.training else 0.0)
    return att.out_proj(context.transpose(1, 2).reshape(b, T, att.d_out))


def forward_cached(model, idx, cache, last_only=False):
    """带缓存的 GPTModel 前向：idx (b, T) 只含新 token，位置编号从 cache.pos 开始。

    返回新 token 的 logits (b, T, vocab)；last_only=True 时只算最后一个位置 (b, 1, vocab)。
    """
    b, T = idx.shape
    cache.check_room(b, T)
    pos = torch.arange(cache.pos, cache.pos + T, device=idx.device)
    x = model.drop_emb(model.tok_emb(idx) + model.pos_emb(pos))
    for layer, block in enumerate(model.trf_blocks):
        x = x + block.drop_shortcut(attention_cached(block.att, block.norm1(x), cache, layer))
        x = x + block.drop_shortcut(block.ff(block.norm2(x)))
    cache.pos += T
    if last_only:
        x = x[:, -1:]
    return model.out_head(model.final_norm(x))


def greedy(logits):
    """默认的取词规则：logits (b, vocab) -> 概率最大的 token (b, 1)。"""
    return logits.argmax(dim=-1, keepdim=True)


def top_k_sampler(temperature=1.0, top_k=None, generator=None):
    """返回一个采样函数：logits 除以温度，只保留最大的 top_k 个，再按 softmax 概率抽样。"""
    if temperature <= 0:
        raise ValueError("temperature 必须大于 0；贪心解码请用默认的 greedy")

    def sample(logits):
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)

    return sample


@torch.inference_mode()
def generate_cached(model, idx, max_new_tokens, cache=None, sample=greedy):
    """带 KV 缓存的生成。默认贪心，结果与 generate_text_simple 逐 token 相同。

    先把整个提示词一次性送入（预填充 prefill），之后每步只送入 1 个新 token。
    最后一个新 token 不必再送入模型，所以需要的缓存长度为 T + max_new_tokens - 1，不能超过 context_length
    （绝对位置嵌入无法“滑动”缓存；更长的生成请用 generate_text_simple 的滑动窗口）。
    传入的 cache 会先 reset()，所以同一个缓存可以依次用于多个提示词。
    """
    b, T = idx.shape
    if max_new_tokens <= 0:
        return idx
    needed = T + max_new_tokens - 1
    if needed > model.cfg["context_length"]:
        raise ValueError(
            f"提示词 {T} 个 token + 生成 {max_new_tokens} 个，需要缓存 {needed} 个位置，"
            f"超过 context_length={model.cfg['context_length']}；请缩短提示词或减少 max_new_tokens"
        )
    if cache is None:
        cache = KVCache.for_model(model, batch_size=b, max_len=needed)
    cache.reset()
    cache.check_room(b, needed)
    out = torch.empty(b, T + max_new_tokens, dtype=idx.dtype, device=idx.device)  # 输出预先分配，不逐步拼接
    out[:, :T] = idx
    logits = forward_cached(model, idx, cache, last_only=True)
    for i in range(T, T + max_new_tokens):
        out[:, i:i + 1] = sample(logits[:, -1])
        if i + 1 < T + max_new_tokens:
            logits = forward_cached(model, out[:, i:i + 1], cache)
    return out
