"""多头因果自注意力 (multi-head causal self-attention)，在 03_attention 中讲解。"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 03_attention/01_attention.ipynb ----
class MultiHeadAttention(nn.Module):
    """多头因果自注意力：一次投影得到所有头的 Q、K、V，拆成 num_heads 个头并行计算，再拼接并做输出投影。

    输入 x 的形状为 (b, T, d_in)，输出为 (b, T, d_out)；要求 T <= context_length。
    use_sdpa=True 时注意力这一步交给 F.scaled_dot_product_attention（第 7 节；GPU 上是 FlashAttention），
    参数与结果都不变，只是更快、更省内存。
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, use_sdpa=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) 必须能被 num_heads ({num_heads}) 整除")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.use_sdpa = use_sdpa
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # 掩码不是参数，但要随模型 .to(device)，所以注册为 buffer（persistent=False：不进 state_dict）
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1),
            persistent=False,
        )

    def forward(self, x):
        b, num_tokens, _ = x.shape
        if num_tokens > self.mask.shape[0]:
            raise ValueError(f"输入长度 {num_tokens} 超过 context_length={self.mask.shape[0]}（掩码只有这么大）")
        # (b, T, d_out) -> (b, num_heads, T, head_dim)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        if self.use_sdpa:  # 同一个公式的融合实现：不存 T×T 的分数矩阵，dropout 只在训练时生效
            context = F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                                     dropout_p=self.dropout.p if self.training else 0.0)
        else:
            attn_scores = queries @ keys.transpose(2, 3) / self.head_dim**0.5
            attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
            context = self.dropout(torch.softmax(attn_scores, dim=-1)) @ values
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))


def tiled_attention(q, k, v, block_size=64):
    """分块的因果注意力（FlashAttention 的思路，第 3 章 7.1 节）：q、k、v 形状 (b, h, T, d)。

    每次只算 block_size 个查询 × block_size 个键的一块分数，用在线 softmax（最大值 m、分母 l、累加器 acc）
    合并各块；结果等于 softmax(QK^T/sqrt(d) + 因果掩码) V，但从不构造 T×T 的矩阵。
    """
    T, scale = q.shape[-2], q.shape[-1] ** -0.5
    outputs = []
    for i in range(0, T, block_size):
        qi = q[..., i:i + block_size, :] * scale                     # (b, h, Bq, d)
        rows = torch.arange(i, i + qi.shape[-2], device=q.device)[:, None]
        m = torch.full(qi.shape[:-1] + (1,), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        for j in range(0, i + qi.shape[-2], block_size):             # 因果：晚于本块最后一个查询的键块整块跳过
            s = qi @ k[..., j:j + block_size, :].transpose(-2, -1)   # (b, h, Bq, Bk)：唯一的"分数"张量
            cols = torch.arange(j, j + s.shape[-1], device=q.device)
            s = s.masked_fill(cols > rows, float("-inf"))            # 只在对角块上真正遮挡
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - m_new)
            alpha = torch.exp(m - m_new)                             # 把旧的 l、acc 换到新的基准 m_new
            l = alpha * l + p.sum(dim=-1, keepdim=True)
            acc = alpha * acc + p @ v[..., j:j + block_size, :]
            m = m_new
        outputs.append(acc / l)
    return torch.cat(outputs, dim=-2)
