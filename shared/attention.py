"""多头因果自注意力 (multi-head causal self-attention)，在 03_attention 中讲解。"""
import torch
import torch.nn as nn

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 03_attention/01_attention.ipynb ----
class MultiHeadAttention(nn.Module):
    """多头因果自注意力：一次投影得到所有头的 Q、K、V，拆成 num_heads 个头并行计算，再拼接并做输出投影。

    输入 x 的形状为 (b, T, d_in)，输出为 (b, T, d_out)；要求 T <= context_length。
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) 必须能被 num_heads ({num_heads}) 整除")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
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

        attn_scores = queries @ keys.transpose(2, 3) / self.head_dim**0.5
        attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        attn_weights = self.dropout(torch.softmax(attn_scores, dim=-1))

        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)
