"""文本数据：滑动窗口数据集 ``GPTDataset`` 与 ``create_dataloader``，在 02_data_engineering 中讲解。

把整段文本编码成词元 (token) id，再按上下文长度 ``max_length`` 与步幅 ``stride`` 切成
（输入, 目标）对，目标就是输入整体右移一位，供下一个词元预测 (next-token prediction) 训练使用。
"""
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizer import get_gpt2_tokenizer

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 02_data_engineering/01_text_data.ipynb ----
def encode_text(tokenizer, txt):
    """用分词器把文本编码成 id 列表；对 tiktoken 显式允许 ``<|endoftext|>``（它默认拒绝特殊词元）。"""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
    return list(tokenizer.encode(txt))


class GPTDataset(Dataset):
    """滑动窗口数据集：第 k 个样本的输入是 ``ids[k*stride : k*stride+max_length]``，目标右移一位。"""

    def __init__(self, txt, tokenizer, max_length, stride):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length 与 stride 必须是正整数，收到 max_length={max_length}, stride={stride}")
        token_ids = encode_text(tokenizer, txt)
        if len(token_ids) < max_length + 1:
            raise ValueError(
                f"文本只有 {len(token_ids)} 个词元，至少需要 max_length + 1 = {max_length + 1} 个才能切出一个"
                f"（输入, 目标）窗口；请换更长的文本或减小 max_length"
            )
        self.input_ids, self.target_ids = [], []
        # 起点 i 满足 i + max_length <= len - 1，保证目标的最后一个词元存在
        for i in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[i:i + max_length]))
            self.target_ids.append(torch.tensor(token_ids[i + 1:i + max_length + 1]))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True,
                      num_workers=0, tokenizer=None, seed=None):
    """把文本变成 (输入, 目标) 批次的 DataLoader；``tokenizer`` 默认用 GPT-2，给定 ``seed`` 时打乱顺序可复现。"""
    tokenizer = get_gpt2_tokenizer() if tokenizer is None else tokenizer
    dataset = GPTDataset(txt, tokenizer, max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"只有 {len(dataset)} 个窗口，不够一个 batch_size={batch_size} 的批次，drop_last=True 会得到空的加载器；"
            f"请减小 batch_size / stride，或传 drop_last=False"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
