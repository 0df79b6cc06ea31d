"""训练记录与诊断：TensorBoard 记录器（第 5 章 train_model / train_loop 的 monitor 参数）、按层组的更新比例，
以及不启动服务就读回事件文件的函数，在 05_pretraining/bonus_monitoring_and_tuning 中讲解。"""
import math

import pandas as pd
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from .runtime import eval_mode

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_monitoring_and_tuning.ipynb ----
def param_group(name):
    """GPTModel 的参数名 -> 层组：embedding / attention / mlp / norm / head / other（torch.compile 的前缀会被去掉）。"""
    name = name.removeprefix("_orig_mod.")
    if name.startswith(("tok_emb", "pos_emb")):
        return "embedding"
    if ".att." in name:
        return "attention"
    if ".ff." in name:
        return "mlp"
    if "norm" in name:
        return "norm"
    return "head" if name.startswith("out_head") else "other"


def update_ratios(before, after, group_of=param_group):
    """每个层组的 ||W_after - W_before|| / ||W_before||，组内所有参数拼成一个向量算范数。before、after：{参数名: 张量}。
    权重全为 0 的组（没有可比的尺度）记为 nan。"""
    delta, weight = {}, {}
    for name, old in before.items():
        group = group_of(name)
        delta[group] = delta.get(group, 0.0) + (after[name].float() - old.float()).pow(2).sum().item()
        weight[group] = weight.get(group, 0.0) + old.float().pow(2).sum().item()
    return {g: math.sqrt(delta[g] / weight[g]) if weight[g] > 0 else math.nan for g in delta}


class TensorBoardMonitor:
    """训练记录器（第 5 章 train_model / train_loop 的 monitor 参数），写 TensorBoard 事件文件到 log_dir：
    每步 train/loss、train/lr、train/grad_norm（裁剪前）与 speed/tokens_per_s（给出 tokens_per_step 时）；
    每 ratio_every 步 update_ratio/<层组>；每次评估 eval/train_loss、eval/val_loss；
    给出 sample_fn(model) -> str 时每 sample_every 步写一段文本 sample。用完调用 close()，或用 with 语句。"""

    def __init__(self, log_dir, tokens_per_step=None, ratio_every=10, sample_fn=None, sample_every=None,
                 group_of=param_group):
        self.writer = SummaryWriter(str(log_dir))
        self.tokens_per_step, self.ratio_every, self.group_of = tokens_per_step, ratio_every, group_of
        self.sample_fn, self.sample_every = sample_fn, sample_every
        self.updates, self.model, self.grad_norm, self.before, self.ratios = 0, None, None, None, None

    def before_update(self, model, grad_norm):
        self.model, self.grad_norm = model, float(grad_norm)
        if self.updates % self.ratio_every == 0:
            self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def after_update(self, model):
        if self.before is not None:
            after = {n: p.detach() for n, p in model.named_parameters() if n in self.before}
            self.ratios, self.before = update_ratios(self.before, after, self.group_of), None
        self.updates += 1

    def on_step(self, step, loss, lr, seconds):
        add = self.writer.add_scalar
        add("train/loss", loss, step)
        add("train/lr", lr, step)
        if self.grad_norm is not None:
            add("train/grad_norm", self.grad_norm, step)
        if self.tokens_per_step and seconds > 0:
            add("speed/tokens_per_s", self.tokens_per_step / seconds, step)
        for group, ratio in (self.ratios or {}).items():
            add(f"update_ratio/{group}", ratio, step)
        self.ratios = None
        if self.sample_fn is not None and self.sample_every and step % self.sample_every == 0:
            with eval_mode(self.model), torch.no_grad():
                self.writer.add_text("sample", self.sample_fn(self.model), step)

    def on_eval(self, step, train_loss, val_loss):
        self.writer.add_scalar("eval/train_loss", train_loss, step)
        self.writer.add_scalar("eval/val_loss", val_loss, step)

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})  # 0 表示全部读入，不抽样
    events.Reload()
    return events


def read_scalars(log_dir):
    """用 tensorboard 自带的 EventAccumulator 读回 log_dir 里的全部标量（不需要启动服务）：{标签: DataFrame(step, value)}。"""
    events = _events(log_dir)
    return {tag: pd.DataFrame([(e.step, e.value) for e in events.Scalars(tag)], columns=["step", "value"])
            for tag in events.Tags()["scalars"]}


def read_texts(log_dir, tag="sample"):
    """读回 add_text 写入的文本：{step: 文本}。"""
    return {e.step: e.tensor_proto.string_val[0].decode("utf-8") for e in _events(log_dir).Tensors(f"{tag}/text_summary")}
