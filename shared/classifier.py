"""文本分类微调：SMS 垃圾短信数据、均衡分层切分、右侧填充、取最后一个真实 token 分类、
换分类头并冻结、准确率与训练循环，在 06_finetuning/01_classification 中讲解；
取第一个 token 与平均池化两种对照，在 06_finetuning/bonus_classification_experiments 中讲解。"""
import zipfile

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .download import SMS_SPAM_ZIP, download
from .runtime import eval_mode
from .tokenizer import EOT_ID
from .train import autocast, endless_batches, train_loop

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/01_classification.ipynb ----
LABELS = ("ham", "spam")  # 类别 id 0 与 1 对应的名字


def load_sms_spam():
    """读取 SMS Spam Collection，返回 DataFrame（列 label 为 "ham"/"spam"，列 text 为短信原文）。"""
    with zipfile.ZipFile(download(SMS_SPAM_ZIP)) as zf:
        raw = zf.read("SMSSpamCollection").decode("utf-8")
    rows = [line.split("\t", 1) for line in raw.splitlines() if line.strip()]
    bad = [row for row in rows if len(row) != 2 or row[0] not in LABELS]
    if bad:
        raise ValueError(f"SMSSpamCollection 中有 {len(bad)} 行格式不对，例如 {bad[0]!r}")
    return pd.DataFrame(rows, columns=["label", "text"])


def balanced_split(df, fractions=(0.7, 0.1, 0.2), seed=123):
    """去重、把多数类下采样到与少数类同样多，再在每个类别内按 fractions 切分（分层）。
    返回 {"train": df, "val": df, "test": df}，每份都已打乱且两类各占一半。"""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions 应是三个加起来为 1 的比例，收到 {fractions}")
    df = df.drop_duplicates("text")
    rng = np.random.default_rng(seed)
    n = df["label"].value_counts().min()
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    groups = [group.iloc[rng.permutation(len(group))[:n]] for _, group in df.groupby("label")]  # 每类随机取 n 条
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    return {name: pd.concat([g.iloc[cut] for g in groups]).sample(frac=1, random_state=seed).reset_index(drop=True)
            for name, cut in cuts.items()}


class SpamDataset(Dataset):
    """把每条短信编码成 token id 列表（超过 max_length 时只保留前 max_length 个），标签 ham=0、spam=1。"""

    def __init__(self, df, tokenizer, max_length):
        self.encoded = [tokenizer.encode(text)[:max_length] for text in df["text"]]
        self.labels = [LABELS.index(label) for label in df["label"]]
        if any(len(ids) == 0 for ids in self.encoded):
            raise ValueError("有短信编码后长度为 0，无法取它的最后一个 token")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.encoded[i], self.labels[i]


def collate_classification(batch, pad_id=EOT_ID):
    """[(ids, label), ...] -> input_ids (B, T)、lengths (B,)、labels (B,)；右侧用 pad_id 补齐到本批最长。"""
    lengths = torch.tensor([len(ids) for ids, _ in batch])
    input_ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
    return input_ids, lengths, torch.tensor([label for _, label in batch])


def last_token_logits(model, input_ids, lengths):
    """模型输出 (B, T, C) 中，取每条序列最后一个真实 token（位置 lengths-1）的 logits，得到 (B, C)。"""
    logits = model(input_ids)
    rows = torch.arange(input_ids.shape[0], device=logits.device)
    return logits[rows, lengths.to(logits.device) - 1]


def replace_head_and_freeze(model, num_classes=2, trainable_blocks=1):
    """把输出头换成 num_classes 类的线性层，并冻结其余参数：只训练最后 trainable_blocks 个块、final_norm 与新输出头。
    trainable_blocks=None 表示不冻结任何参数（全部微调）。"""
    weight = model.tok_emb.weight
    model.requires_grad_(trainable_blocks is None)
    model.out_head = nn.Linear(model.cfg["emb_dim"], num_classes).to(weight.device, weight.dtype)
    if trainable_blocks is not None:
        n = len(model.trf_blocks)
        if not 0 <= trainable_blocks <= n:
            raise ValueError(f"trainable_blocks 应在 0 到 {n} 之间，收到 {trainable_blocks}")
        for block in model.trf_blocks[n - trainable_blocks:]:
            block.requires_grad_(True)
        model.final_norm.requires_grad_(True)
    return model


def count_parameters(model):
    """(可训练参数量, 总参数量)。"""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def calc_accuracy(logits, labels):
    """logits (B, C) 与整数标签 (B,) -> argmax 预测正确的比例（Python float）。"""
    if logits.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"logits 与 labels 的样本数不符或为空：{tuple(logits.shape)} vs {tuple(labels.shape)}")
    return (logits.argmax(dim=-1) == labels.to(logits.device)).float().mean().item()


@torch.no_grad()
def predict_loader(model, loader, device, max_batches=None, pool=last_token_logits):
    """在 eval 模式下对 loader 中的（前 max_batches 个）批次做预测，返回 (logits (N, C), labels (N,))，都在 CPU 上。
    pool(model, input_ids, lengths) -> (B, C) 决定用哪个位置的输出分类，默认是最后一个真实 token。"""
    all_logits, all_labels = [], []
    with eval_mode(model):
        for i, (input_ids, lengths, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            all_logits.append(pool(model, input_ids.to(device), lengths).float().cpu())
            all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate_classifier(model, loader, device, max_batches=None, pool=last_token_logits):
    """(平均交叉熵, 准确率)，按样本数加权。"""
    logits, labels = predict_loader(model, loader, device, max_batches, pool)
    return F.cross_entropy(logits, labels).item(), calc_accuracy(logits, labels)


def train_classifier(model, train_loader, val_loader, optimizer, device, num_epochs, eval_every=25, eval_batches=5,
                     acc_batches=None, progress=True, autocast_dtype=None):
    """分类微调：用第 5 章的 train_loop，只换损失函数与每步之后的记录。每 eval_every 步记录最近这些步的平均训练损失
    与验证集前 eval_batches 个批次的损失；每个 epoch 末记录训练集（前 acc_batches 个批次）与验证集的准确率。"""
    history = {"step": [], "train_loss": [], "val_loss": [], "epoch_step": [], "train_acc": [], "val_acc": []}
    steps_per_epoch, recent = len(train_loader), []

    def loss_fn(batch):
        input_ids, lengths, labels = batch
        return F.cross_entropy(last_token_logits(model, input_ids.to(device), lengths), labels.to(device))

    def on_step(step, loss, lr):
        recent.append(loss)
        if step % eval_every == 0:
            history["step"].append(step)
            history["train_loss"].append(sum(recent) / len(recent))
            history["val_loss"].append(evaluate_classifier(model, val_loader, device, eval_batches)[0])
            recent.clear()
        if step % steps_per_epoch == 0:
            history["epoch_step"].append(step)
            history["train_acc"].append(evaluate_classifier(model, train_loader, device, acc_batches)[1])
            history["val_acc"].append(evaluate_classifier(model, val_loader, device)[1])
            if progress:
                print(f"epoch {step // steps_per_epoch}: 训练准确率 {history['train_acc'][-1]:.1%}，"
                      f"验证准确率 {history['val_acc'][-1]:.1%}")

    train_loop(model, optimizer, endless_batches(train_loader), loss_fn, range(num_epochs * steps_per_epoch),
               amp=autocast(device, autocast_dtype), on_step=on_step, progress=progress, desc="finetune")
    return history


def confusion_matrix(predictions, labels, num_classes=2):
    """cm[i, j] = 真实类别为 i、预测为 j 的样本数。"""
    cm = np.zeros((num_classes, num_classes), dtype=int)
    for t, p in zip(labels.tolist(), predictions.tolist()):
        cm[t, p] += 1
    return cm


@torch.no_grad()
def classify_text(text, model, tokenizer, device, max_length, labels=LABELS):
    """返回 (预测的类别名, 该类别的概率)。超过 max_length 的文本只看前 max_length 个 token。"""
    ids = tokenizer.encode(text)[:max_length]
    if not ids:
        raise ValueError("空文本无法分类")
    with eval_mode(model):
        logits = last_token_logits(model, torch.tensor([ids], device=device), torch.tensor([len(ids)]))
    probs = torch.softmax(logits[0].float(), dim=-1)
    k = int(probs.argmax())
    return labels[k], probs[k].item()


# ---- 06_finetuning/bonus_classification_experiments.ipynb ----
def first_token_logits(model, input_ids, lengths):
    """取每条序列第一个 token 的 logits，得到 (B, C)。因果注意力下，第一个 token 只看得到它自己。"""
    return model(input_ids)[:, 0]


def mean_pooled_logits(model, input_ids, lengths):
    """对每条序列前 lengths 个真实 token 的 logits 取平均，得到 (B, C)；填充位置不计入。
    输出头是线性（仿射）层，所以这与“先对隐藏状态取平均、再过输出头”完全相同。"""
    logits = model(input_ids)
    lengths = lengths.to(logits.device)
    real = torch.arange(input_ids.shape[1], device=logits.device) < lengths[:, None]
    return (logits * real[..., None]).sum(dim=1) / lengths[:, None]
