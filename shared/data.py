"""文本数据：按需切窗口的滑动窗口数据集 ``TokenWindows`` 与 ``create_dataloader``，在 02_data_engineering 中讲解。
把整段文本编码成词元 (token) id，再按上下文长度 ``max_length`` 与步幅 ``stride`` 切成
（输入, 目标）对，目标就是输入整体右移一位，供下一个 token 预测 (next-token prediction) 训练使用；
另有原始 Transformer 的固定正弦位置编码 ``sinusoidal_positions``。"""
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizer import get_gpt2_tokenizer

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 02_data_engineering/01_text_data.ipynb ----
def encode_text(tokenizer, txt):
    """用分词器把文本编码成 id 列表；对 tiktoken 显式允许 ``<|endoftext|>``（它默认拒绝特殊 token）。"""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
    return list(tokenizer.encode(txt))


class TokenWindows(Dataset):
    """滑动窗口数据集：第 k 个样本的输入是 ``ids[k*stride : k*stride+max_length]``，目标右移一位。
    只保存一份 token id，窗口在取用时才切出来（切片是视图，不复制），所以 stride=1 也不多占内存。"""

    def __init__(self, token_ids, max_length, stride):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length 与 stride 必须是正整数，收到 max_length={max_length}, stride={stride}")
        self.ids = torch.as_tensor(token_ids, dtype=torch.long)
        if self.ids.dim() != 1 or len(self.ids) < max_length + 1:
            raise ValueError(f"需要一维的 token id 序列，且至少 max_length + 1 = {max_length + 1} 个才能切出一个"
                             f"（输入, 目标）窗口；收到形状 {tuple(self.ids.shape)}。请换更长的文本或减小 max_length")
        self.max_length, self.stride = max_length, stride
        # 起点 i = k*stride 满足 i + max_length <= N - 1，保证目标的最后一个 token 存在
        self.n = (len(self.ids) - max_length - 1) // stride + 1

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if not 0 <= k < self.n:
            raise IndexError(f"窗口下标 {k} 超出范围 [0, {self.n})")
        chunk = self.ids[k * self.stride:k * self.stride + self.max_length + 1]
        return chunk[:-1], chunk[1:]


def create_dataloader(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True,
                      num_workers=0, tokenizer=None, seed=None):
    """把文本变成 (输入, 目标) 批次的 DataLoader；``tokenizer`` 默认用 GPT-2，给定 ``seed`` 时打乱顺序可复现。"""
    tokenizer = get_gpt2_tokenizer() if tokenizer is None else tokenizer
    dataset = TokenWindows(encode_text(tokenizer, txt), max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"只有 {len(dataset)} 个窗口，不够一个 batch_size={batch_size} 的批次，drop_last=True "
                         "会得到空的加载器；请减小 batch_size / stride，或传 drop_last=False")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def sinusoidal_positions(num_positions, dim, base=10000.0):
    """原始 Transformer 的固定正弦位置编码，形状 (num_positions, dim)，float32：
    ``PE[pos, 2i] = sin(pos * w_i)``，``PE[pos, 2i+1] = cos(pos * w_i)``，其中 ``w_i = base ** (-2i / dim)``。"""
    if dim % 2:
        raise ValueError(f"dim 必须是偶数（正弦与余弦成对出现），收到 dim={dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]           # (num_positions, 1)
    omega = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)     # (dim/2,)，每对维度的角速度
    angles = pos * omega                                                      # (num_positions, dim/2)
    pe = torch.empty(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles), torch.cos(angles)         # 偶数维 sin，奇数维 cos
    return pe.float()
