"""中文评论情感分类的实验工具：读取并清洗评论 CSV、分层切分、学习曲线用的嵌套分层子集、
字 n-gram 逻辑回归基线、字符级分词器，在 06_finetuning/bonus_classification_experiments 中讲解。"""
import itertools

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .download import download
from .train import train_loop

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/bonus_classification_experiments.ipynb ----
def load_reviews(url):
    """读取 label(0/1),review 两列的评论 CSV，清洗后返回 (DataFrame（列 text、label）, 清洗报告)。
    清洗：去掉首尾空白与空评论；同一段文字标签互相矛盾的全部丢掉；其余重复的只留第一条。"""
    raw = pd.read_csv(download(url), dtype={"review": str})
    if list(raw.columns) != ["label", "review"] or not raw["label"].isin([0, 1]).all():
        raise ValueError(f"{url.rsplit('/', 1)[-1]} 应为 label(0/1),review 两列")
    df = pd.DataFrame({"text": raw["review"].fillna("").str.strip(), "label": raw["label"].astype(int)})
    empty = df["text"] == ""
    df = df[~empty]
    conflicting = df.groupby("text")["label"].transform("nunique") > 1
    clean = df[~conflicting].drop_duplicates("text").reset_index(drop=True)
    report = {"rows": len(raw), "empty": int(empty.sum()), "conflicting": int(conflicting.sum()),
              "duplicates": int(len(df) - conflicting.sum() - len(clean)), "kept": len(clean)}
    return clean, report


def stratified_split(df, fractions=(0.7, 0.1, 0.2), seed=0):
    """在每个类别内打乱后按 fractions 切成 train/val/test（分层：每份的类别比例与全集相同）。"""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions 应是三个加起来为 1 的比例，收到 {fractions}")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for _, group in df.groupby("label"):
        group = group.iloc[rng.permutation(len(group))]
        n_train, n_val = round(fractions[0] * len(group)), round(fractions[1] * len(group))
        for name, cut in zip(parts, (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))):
            parts[name].append(group.iloc[cut])
    return {name: pd.concat(p).sample(frac=1, random_state=seed).reset_index(drop=True) for name, p in parts.items()}


def ngrams(text, n_max=2):
    """text 中所有长度 1..n_max 的字 n-gram（去重，按首次出现的顺序）。"""
    return list(dict.fromkeys(text[i:i + n] for n in range(1, n_max + 1) for i in range(len(text) - n + 1)))


class NgramLogReg(nn.Module):
    """字 n-gram 词袋上的逻辑回归：每个 n-gram 一个权重，求和再加偏置就是 logit。用 nn.EmbeddingBag 按下标求和，
    不建 (样本数, 词表大小) 的稠密矩阵。词表只含训练文本中出现在至少 min_count 条里的 n-gram，其余的忽略。"""

    def __init__(self, texts, n_max=2, min_count=2, max_features=50_000):
        super().__init__()
        counts = pd.Series([g for t in texts for g in ngrams(t, n_max)]).value_counts()
        kept = counts[counts >= min_count].index[:max_features]
        self.vocab = {g: i for i, g in enumerate(kept)}
        self.n_max = n_max
        self.weights = nn.EmbeddingBag(max(len(self.vocab), 1), 1, mode="sum")
        nn.init.zeros_(self.weights.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def encode(self, texts):
        """(ids, offsets)：EmbeddingBag 的输入格式，第 i 条文本的 n-gram 下标是 ids[offsets[i]:offsets[i+1]]。"""
        rows = [[self.vocab[g] for g in ngrams(t, self.n_max) if g in self.vocab] for t in texts]
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        return torch.tensor([i for r in rows for i in r], dtype=torch.long), offsets

    def forward(self, ids, offsets):
        return self.weights(ids, offsets).squeeze(-1) + self.bias


def train_ngram_logreg(train_df, n_max=2, epochs=30, lr=0.1, weight_decay=1e-4):
    """用全批量 AdamW 训练 NgramLogReg（二分类交叉熵），返回模型：每个 epoch 是第 5 章 train_loop 的一步，
    整个训练集就是那一批（不裁剪梯度）。权重从 0 开始，结果只取决于数据。"""
    model = NgramLogReg(train_df["text"], n_max)
    batch = (*model.encode(train_df["text"]), torch.tensor(train_df["label"].to_numpy(), dtype=torch.float))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train_loop(model, optimizer, itertools.repeat(batch),
               lambda b: F.binary_cross_entropy_with_logits(model(b[0], b[1]), b[2]), range(epochs),
               grad_clip=None, progress=False)
    return model


@torch.no_grad()
def ngram_accuracy(model, df):
    """NgramLogReg 在 df 上的准确率（logit > 0 判为好评）。"""
    return float(((model(*model.encode(df["text"])) > 0).long().numpy() == df["label"].to_numpy()).mean())


PAD_ID, UNK_ID, SEP_ID = 0, 1, 2  # 填充、词表外的字、两条评论之间的分隔


class CharTokenizer:
    """字符级分词器：训练文本里出现至少 min_count 次的字各占一个 id，其余的字都映射到 UNK_ID。"""

    def __init__(self, texts, min_count=3):
        counts = pd.Series(list("".join(texts))).value_counts()
        self.chars = ["<pad>", "<unk>", "<sep>"] + sorted(counts[counts >= min_count].index)
        self.ids = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        return [self.ids.get(ch, UNK_ID) for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def nested_subsets(labels, sizes, seed=0):
    """学习曲线用的训练子集：返回 {n: 下标数组}。子集层层嵌套（小的是大的前缀），每个都分层：
    每类先各自打乱，再按“在本类中的进度” (i + 0.5) / 本类样本数 合并成一个顺序，取前 n 个。"""
    labels = np.asarray(labels)
    if any(n < 1 or n > len(labels) for n in sizes):
        raise ValueError(f"子集大小应在 1 到 {len(labels)} 之间，收到 {list(sizes)}")
    rng = np.random.default_rng(seed)
    order, progress = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        order.append(idx)
        progress.append((np.arange(len(idx)) + 0.5) / len(idx))
    order = np.concatenate(order)[np.argsort(np.concatenate(progress), kind="stable")]
    return {n: order[:n] for n in sizes}
