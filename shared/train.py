"""预训练工具：损失、可续训的数据顺序、AdamW 配置、预热+余弦学习率，以及各章共用的训练循环
（train_step / train_loop，损失与每步之后的动作由调用方给出）与语言模型的 train_model，在 05_pretraining 中讲解。
"""
import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from .checkpoint import save_checkpoint
from .data import TokenWindows
from .runtime import eval_mode, progress_bar

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/01_pretraining.ipynb ----
IGNORE_INDEX = -100  # 目标为它的位置不计入损失（F.cross_entropy 的默认值）；指令微调用它屏蔽提示词与填充


def calc_loss_batch(input_batch, target_batch, model, device):
    """一个批次的平均交叉熵（单位 nats/token），目标为 IGNORE_INDEX 的位置不计入。

    有被屏蔽的目标时（第 6 章的指令微调），只在其余位置算输出层（GPTModel 的 keep 参数）：结果相同，计算少得多。
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    keep = target_batch != IGNORE_INDEX
    if keep.all():
        return F.cross_entropy(model(input_batch).flatten(0, 1).float(), target_batch.flatten())
    return F.cross_entropy(model(input_batch, keep=keep).float(), target_batch[keep])


@torch.no_grad()
def calc_loss_loader(data_loader, model, device, num_batches=None):
    """前 num_batches 个批次（None 表示全部）损失的平均值；loader 为空时返回 nan。"""
    if len(data_loader) == 0:
        return float("nan")
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= n:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / n


class EpochShuffleSampler(Sampler):
    """每个 epoch 的顺序只由 (seed, epoch) 决定，与全局随机状态无关，所以断点续训能复现完全相同的数据顺序。"""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def token_loader(token_ids, batch_size, max_length, stride, shuffle=True, drop_last=True, seed=0):
    """由 token id 构造第 2 章 TokenWindows 的 DataLoader；shuffle=True 时用 EpochShuffleSampler（顺序是 epoch 的函数）。"""
    dataset = TokenWindows(token_ids, max_length, stride)
    sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)


def configure_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), fused=None):
    """AdamW：只对 >=2 维的参数（矩阵、嵌入）做权重衰减，偏置与 LayerNorm 参数不衰减。

    只包含 requires_grad 的参数（LoRA 冻结的参数自动排除）；共享的参数只出现一次。
    fused=None 表示参数都在 CUDA 上时使用 fused 实现。
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("模型没有需要训练的参数（requires_grad 全为 False）")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def cosine_lr(step, max_lr, min_lr, warmup_steps, total_steps):
    """第 step 步（从 0 数）的学习率：线性预热 warmup_steps 步到 max_lr，再按余弦降到 min_lr；total_steps 之后保持 min_lr。"""
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"需要 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(max_lr, warmup_steps, total_steps, min_lr=None):
    """返回学习率函数 lr_at(step) = cosine_lr(step, ...)；min_lr 默认为 max_lr / 10。"""
    min_lr = max_lr / 10 if min_lr is None else min_lr
    cosine_lr(0, max_lr, min_lr, warmup_steps, total_steps)  # 参数不合法时现在就报错
    return lambda step: cosine_lr(step, max_lr, min_lr, warmup_steps, total_steps)


def matmul_gflops(dtype, n=512, repeats=10, device="cpu"):
    """n×n 矩阵乘法在 dtype 下的速度 (GFLOPS)。"""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b  # 预热
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def pick_autocast_dtype(device, rounds=5):
    """训练时用不用 bf16 自动混合精度：GPU 上支持就用；CPU 上交替测 rounds 轮矩阵乘法（打印结果），
    bf16 比 fp32 快 1.2 倍以上才用（返回 torch.bfloat16），否则返回 None（保持 fp32）。"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    fp32 = bf16 = 0.0
    for _ in range(rounds):  # 交替测、各取最好的一次：机器上有别的程序在跑时，单次测量很不可靠
        fp32 = max(fp32, matmul_gflops(torch.float32, device=device))
        bf16 = max(bf16, matmul_gflops(torch.bfloat16, device=device))
    dtype = torch.bfloat16 if bf16 > 1.2 * fp32 else None
    print(f"CPU 矩阵乘法：fp32 {fp32:.0f} GFLOPS，bf16 {bf16:.0f} GFLOPS -> {'用 bf16 autocast' if dtype else '保持 fp32'}")
    return dtype


def endless_batches(loader, start=0):
    """无限地逐个产生批次。每个 epoch 开始时调用 sampler 的 set_epoch（若有），
    并跳过前 start 个批次：数据顺序只取决于“第几个批次”，续训时才能接上。"""
    n = len(loader)
    if n == 0:
        raise ValueError("train_loader 是空的：数据太少，或 batch_size 太大且 drop_last=True")
    epoch, skip = divmod(start, n)
    while True:
        for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def autocast(device, dtype=None):
    """混合精度的上下文：dtype 为 None 时什么也不做（保持 fp32）。"""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def train_step(model, optimizer, batches, loss_fn, grad_accum_steps=1, grad_clip=1.0, amp=None, monitor=None, split=None):
    """一个优化步，返回它的平均损失：grad_accum_steps 个微批次的 loss_fn(batch) 各除以 grad_accum_steps 后反向传播
    （梯度累加），把梯度的总范数裁剪到 grad_clip（None 不裁剪），再 optimizer.step()。损失不是有限数时抛出
    FloatingPointError，参数不更新。monitor（可选）在更新前收到 before_update(model, 裁剪前的梯度范数)，更新后收到 after_update(model)。

    DDP 包装的模型只在最后一个微批次同步梯度：前面的放在 model.no_sync() 里，省掉通信。
    split（可选）把放不下显存的批次切成几份，每份的损失再除以份数：有效批次不变（见 train_loop）。
    """
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(grad_accum_steps):
        batch = next(batches)
        pieces = split(batch) if split is not None else [batch]
        for i, piece in enumerate(pieces):
            last = micro == grad_accum_steps - 1 and i == len(pieces) - 1
            with model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext():
                with amp or contextlib.nullcontext():
                    loss = loss_fn(piece) / (grad_accum_steps * len(pieces))
                loss.backward()
            total += loss.item()
    if not math.isfinite(total):
        raise FloatingPointError(f"训练损失是 {total}，参数没有更新。常见原因：学习率太大、数据有问题（例如一批里所有目标都被屏蔽，平均损失是 0/0）")
    grad_norm = None
    if grad_clip is not None or monitor is not None:  # 返回的是裁剪之前的总范数
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if grad_clip is None else grad_clip)
    if monitor is not None:
        monitor.before_update(model, grad_norm)
    optimizer.step()
    if monitor is not None:
        monitor.after_update(model)
    return total


def train_loop(model, optimizer, batches, loss_fn, steps, *, lr_at=None, grad_accum_steps=1, grad_clip=1.0,
               amp=None, seed=None, on_step=None, monitor=None, progress=True, desc="train"):
    """对 steps 中的每个步号（如 range(start, stop)）做一次 train_step，返回训练用的秒数（不含 on_step）。

    每步开始前：lr_at 给定时把学习率设为 lr_at(step)；seed 给定时 torch.manual_seed(seed + step)，
    dropout 等随机性于是只取决于步数，续训才能逐位复现。每步之后调用 on_step(step + 1, loss, lr)：
    评估、记录与保存检查点都放在那里。预训练、分类、DPO 与 DDP 的训练都用这一个循环，只换 loss_fn 与 on_step。
    损失变成 NaN/inf 时抛出 FloatingPointError 并写明步号。monitor（可选，例如 TensorBoard 记录器）另外在每步之后
    收到 on_step(step + 1, loss, lr, 这一步的秒数)。
    在 CUDA 上，开训前先用内存规划器（选读“训练速度与内存”）核对显存：批次放不下就切成几份逐份累加梯度，
    连 1 条都放不下就停下并说明；其他设备上什么也不做。
    """
    from shared.perf import memory_fitter  # perf 依赖本模块，所以在这里导入
    split = memory_fitter(model, amp is not None)
    model.train()
    seconds = 0.0
    bar = progress_bar(steps, desc=desc, disable=not progress)
    for step in bar:
        start = time.perf_counter()
        if seed is not None:
            torch.manual_seed(seed + step)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        try:
            loss = train_step(model, optimizer, batches, loss_fn, grad_accum_steps, grad_clip, amp, monitor, split)
        except FloatingPointError as err:
            raise FloatingPointError(f"第 {step + 1} 步：{err}") from None
        step_seconds = time.perf_counter() - start
        seconds += step_seconds
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if monitor is not None:
            monitor.on_step(step + 1, loss, optimizer.param_groups[0]["lr"], step_seconds)
        if on_step is not None:
            on_step(step + 1, loss, optimizer.param_groups[0]["lr"])
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # 训练完就释放梯度：留下来的模型不再多占一份参数大小的内存
    return seconds


def sample_batches(loader, num_batches, seed=0):
    """从 loader 的数据集中不放回地随机抽 num_batches 批样本，用 loader 的整理函数组成批次（列表）。

    种子固定，所以每次评估用的是同一组样本，曲线上的起伏只来自模型的变化。num_batches 为 None、
    或不少于全部批次数时返回 loader 本身（评估整个数据集）。
    """
    if num_batches is None or num_batches >= len(loader):
        return loader
    size = loader.batch_size
    order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(seed))[:num_batches * size]
    return [loader.collate_fn([loader.dataset[i] for i in order[k:k + size].tolist()])
            for k in range(0, len(order), size)]


def evaluate(model, train_batches, val_batches, device):
    """在 eval 模式下计算训练集与验证集（各一组批次，见 sample_batches）上的平均损失，返回 (train_loss, val_loss)。"""
    with eval_mode(model):
        return calc_loss_loader(train_batches, model, device), calc_loss_loader(val_batches, model, device)


HISTORY_KEYS = ("step", "tokens_seen", "train_loss", "val_loss", "lr")


def train_model(model, train_loader, val_loader, optimizer, device, *, max_steps, eval_every, eval_batches,
                grad_accum_steps=1, max_lr=None, min_lr=None, warmup_steps=0, grad_clip=1.0, autocast_dtype=None,
                seed=None, sample_fn=None, resume=None, checkpoint_path=None, checkpoint_every=None, stop_step=None,
                monitor=None, progress=True):
    """预训练语言模型到第 max_steps 步，返回 history（HISTORY_KEYS 各对应一个等长列表，另有 train_tokens_per_s）。

    优化本身交给 train_loop；这里只管语言模型的损失、评估记录与检查点：
    - max_lr 给定时学习率按 cosine_schedule(max_lr, warmup_steps, max_steps, min_lr) 调度；
    - 开始前、每 eval_every 步与最后一步之后评估一次：训练集与验证集各用同样多（eval_batches 批）随机抽取的样本，
      两者才可比（None 表示整个数据集）；给出 sample_fn(model) -> str 时再打印一段生成样例；
    - resume：load_checkpoint 的返回值，从它记下的 step、tokens_seen 与 history 接着训练；
    - checkpoint_path 与 checkpoint_every：每隔这么多步（以及最后一步）原子地保存模型与优化器；
    - stop_step：训练到这一步就停（模拟中断，学习率调度仍按 max_steps 计算）；progress=False 时安静地训练；
    - monitor：交给 train_loop，每次评估后还收到 on_eval(step, train_loss, val_loss)。
    """
    start = resume["step"] if resume else 0
    if eval_every < 1 or not 0 <= start <= max_steps:
        raise ValueError(f"需要 eval_every >= 1 且 0 <= 起始步 ({start}) <= max_steps ({max_steps})")
    device = torch.device(device)
    seen = {"tokens": resume["extra"]["tokens_seen"] if resume else 0}
    history = {key: list(resume["extra"]["history"][key]) if resume else [] for key in HISTORY_KEYS}
    lr_at = None if max_lr is None else cosine_schedule(max_lr, warmup_steps, max_steps, min_lr)
    amp = autocast(device, autocast_dtype)
    eval_sets = [sample_batches(loader, eval_batches) for loader in (train_loader, val_loader)]

    def loss_fn(batch):
        seen["tokens"] += batch[0].numel()
        return calc_loss_batch(*batch, model, device)

    def log(step, lr):
        with amp:
            losses = evaluate(model, *eval_sets, device)
        for key, value in zip(HISTORY_KEYS, (step, seen["tokens"], *losses, lr)):
            history[key].append(value)
        if monitor is not None:
            monitor.on_eval(step, *losses)
        if progress:
            print(f"step {step:5d} | tokens {seen['tokens']:9,d} | train {losses[0]:.3f} | val {losses[1]:.3f} | lr {lr:.2e}")
            if sample_fn is not None:
                with eval_mode(model), torch.no_grad():
                    print("  样例:", repr(sample_fn(model)))

    def on_step(step, loss, lr):
        if step % eval_every == 0 or step == max_steps:
            log(step, lr)
        if checkpoint_path is not None and checkpoint_every and (step % checkpoint_every == 0 or step == max_steps):
            save_checkpoint(checkpoint_path, model, optimizer, step=step,
                            extra={"tokens_seen": seen["tokens"], "history": history})

    if start == 0:
        log(0, lr_at(0) if lr_at else optimizer.param_groups[0]["lr"])
    tokens_before = seen["tokens"]
    stop = max_steps if stop_step is None else min(stop_step, max_steps)
    seconds = train_loop(model, optimizer, endless_batches(train_loader, start * grad_accum_steps), loss_fn,
                         range(start, stop), lr_at=lr_at, grad_accum_steps=grad_accum_steps, grad_clip=grad_clip,
                         amp=amp, seed=seed, on_step=on_step, monitor=monitor, progress=progress)
    history["train_tokens_per_s"] = (seen["tokens"] - tokens_before) / seconds if seconds else float("nan")
    return history
