"""KV 缓存 (KV cache)：让模型逐 token 生成时不再重复计算前文的 K、V，在 04_gpt_model/bonus_kv_cache 中讲解。

GPTModel.forward(idx, cache=...) 调用这里的 forward_cached：它直接使用模型自己的子模块（tok_emb、att.W_query、ff……），
只把注意力这一步换成“新 token 的 Q 对缓存中全部 K、V”的计算。Llama/Qwen3 用同一个 KVCache。
"""
import torch
import torch.nn.functional as F

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 04_gpt_model/bonus_kv_cache.ipynb ----
class KVCache:
    """预分配的 K/V 缓存：形状 (n_layers, batch, n_heads, max_len, head_dim)，按位置写入，从不拼接。

    max_len 默认且最大为 context_length（位置编码只有这么多个位置）。模型的 make_cache 按自己的形状建它。
    """

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, context_length, device=None,
                 dtype=torch.float32):
        max_len = context_length if max_len is None else max_len
        if not 1 <= max_len <= context_length:
            raise ValueError(f"max_len={max_len} 必须在 1 与 context_length={context_length} 之间")
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # 已缓存的 token 数 = 下一个 token 的位置编号

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

    def reorder(self, rows):
        """束搜索用：新的第 i 行是旧的第 rows[i] 行（可以重复），批大小变为 len(rows)。"""
        rows = torch.as_tensor(rows, device=self.keys.device)
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        self.batch_size = len(rows)


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


def forward_cached(model, idx, cache):
    """带缓存的 GPTModel 前向：idx (b, T) 只含新 token，位置编号从 cache.pos 开始；返回新 token 的 logits (b, T, vocab)。"""
    b, T = idx.shape
    cache.check_room(b, T)
    pos = torch.arange(cache.pos, cache.pos + T, device=idx.device)
    x = model.drop_emb(model.tok_emb(idx) + model.pos_emb(pos))
    for layer, block in enumerate(model.trf_blocks):
        x = x + block.drop_shortcut(attention_cached(block.att, block.norm1(x), cache, layer))
        x = x + block.drop_shortcut(block.ff(block.norm2(x)))
    cache.pos += T
    return model.lm_head(x)
