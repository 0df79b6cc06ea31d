"""预训练工具：损失、数据窗口、AdamW 配置、预热+余弦学习率、训练循环、检查点与第 5 章基础模型，在 05_pretraining 中讲解。"""
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .model import GPTModel
from .runtime import PROFILE, checkpoint_dir

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/01_pretraining.ipynb ----
def calc_loss_batch(input_batch, target_batch, model, device):
    """一个批次的平均交叉熵（单位 nats/token）。目标为 -100 的位置不计入（指令微调用它屏蔽提示部分）。"""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten(), ignore_index=-100)


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


class TokenWindows(Dataset):
    """把一长串 token id 切成 (输入, 目标) 窗口：目标是输入右移一位。第 i 个窗口从 i*stride 开始。"""

    def __init__(self, token_ids, max_length, stride):
        self.ids = torch.as_tensor(token_ids, dtype=torch.long)
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length ({max_length}) 与 stride ({stride}) 都必须 >= 1")
        if len(self.ids) <= max_length:
            raise ValueError(f"只有 {len(self.ids)} 个 token，不够切出一个长度为 {max_length} 的窗口（还需要 1 个目标 token）")
        self.max_length, self.stride = max_length, stride
        self.n = (len(self.ids) - max_length - 1) // stride + 1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = i * self.stride
        chunk = self.ids[start:start + self.max_length + 1]
        return chunk[:-1], chunk[1:]


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
    """由 token id 构造 DataLoader；shuffle=True 时用 EpochShuffleSampler（顺序是 epoch 的函数）。"""
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


HISTORY_KEYS = ("step", "tokens_seen", "train_loss", "val_loss", "lr")


def _endless_batches(loader, start=0):
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


def evaluate(model, train_loader, val_loader, device, eval_batches, autocast_dtype=None):
    """在 eval 模式下估计训练集与验证集的损失（各取前 eval_batches 个批次）。"""
    model.eval()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        train_loss = calc_loss_loader(train_loader, model, device, eval_batches)
        val_loss = calc_loss_loader(val_loader, model, device, eval_batches)
    model.train()
    return train_loss, val_loss


def train_model(model, train_loader, val_loader, optimizer, device, *, max_steps, eval_every, eval_batches,
                grad_accum_steps=1, max_lr=None, min_lr=None, warmup_steps=0, grad_clip=1.0,
                autocast_dtype=None, sample_prompt=None, tokenizer=None, sample_tokens=40, start_step=0,
                tokens_seen=0, history=None, seed=None, checkpoint_path=None, checkpoint_every=None,
                stop_step=None, progress=True):
    """训练到第 max_steps 个优化步，返回 history 字典（各键对应等长列表，见 HISTORY_KEYS）。

    - 一个“步”(step) = grad_accum_steps 个微批次的梯度累加 + 一次 optimizer.step()；
    - max_lr 给定时学习率按 cosine_lr(step, max_lr, min_lr, warmup_steps, max_steps) 调度；
    - 每 eval_every 步（以及第一步之前、最后一步之后）评估一次，并在给出 sample_prompt 与 tokenizer 时贪心生成一段样例；
    - 续训：传入 load_checkpoint 返回的 step（start_step）、tokens_seen 与 history。数据顺序是批次序号的函数
      （配合 set_epoch 的 sampler，如 token_loader），seed 不为 None 时每步开始前用 seed+step 重设随机种子
      （dropout 等随机性也成为步数的函数），于是续训与不中断的训练逐步得到相同的损失；
    - checkpoint_path 与 checkpoint_every 给定时，每隔这么多步原子地保存一次模型与优化器；
    - stop_step 给定时训练到这一步就停（模拟中断；学习率调度仍按 max_steps 计算）；
    - progress=False 时不显示进度条，也不打印评估结果与样例。
    """
    if grad_accum_steps < 1 or eval_every < 1 or max_steps < start_step:
        raise ValueError("需要 grad_accum_steps >= 1、eval_every >= 1 且 max_steps >= start_step")
    if (sample_prompt is None) != (tokenizer is None):
        raise ValueError("生成样例需要同时给出 sample_prompt 与 tokenizer")
    device = torch.device(device)
    history = {k: list((history or {}).get(k, [])) for k in HISTORY_KEYS}
    min_lr = (max_lr or 0.0) * 0.1 if min_lr is None else min_lr
    batches = _endless_batches(train_loader, start=start_step * grad_accum_steps)
    amp = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)

    def log(step, lr):
        train_loss, val_loss = evaluate(model, train_loader, val_loader, device, eval_batches, autocast_dtype)
        for key, value in zip(HISTORY_KEYS, (step, tokens_seen, train_loss, val_loss, lr)):
            history[key].append(value)
        if not progress:
            return
        bar.write(f"step {step:5d} | tokens {tokens_seen:9,d} | train {train_loss:.3f} | val {val_loss:.3f} | lr {lr:.2e}")
        if sample_prompt is not None:
            bar.write("  样例: " + repr(_sample(model, sample_prompt, tokenizer, sample_tokens, device)))

    model.train()
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, disable=not progress,
               mininterval=2.0, desc="train", unit="step")
    if start_step == 0:
        log(0, optimizer.param_groups[0]["lr"] if max_lr is None else cosine_lr(0, max_lr, min_lr, warmup_steps, max_steps))
    train_time, train_tokens = 0.0, 0
    for step in bar:
        if stop_step is not None and step >= stop_step:
            break
        t0 = time.perf_counter()
        if seed is not None:
            torch.manual_seed(seed + step)
        lr = optimizer.param_groups[0]["lr"]
        if max_lr is not None:
            lr = cosine_lr(step, max_lr, min_lr, warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(grad_accum_steps):
            input_batch, target_batch = next(batches)
            with amp:
                loss = calc_loss_batch(input_batch, target_batch, model, device) / grad_accum_steps
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += input_batch.numel()
            train_tokens += input_batch.numel()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        train_time += time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{train_tokens / train_time:,.0f}")
        done = step + 1
        if done % eval_every == 0 or done == max_steps:
            log(done, lr)
        if checkpoint_path is not None and checkpoint_every and (done % checkpoint_every == 0 or done == max_steps):
            save_checkpoint(checkpoint_path, model, optimizer, step=done,
                            extra={"tokens_seen": tokens_seen, "history": history})
    bar.close()
    history["train_tokens_per_s"] = train_tokens / train_time if train_time else float("nan")
    return history


def _sample(model, prompt, tokenizer, max_new_tokens, device):
    """训练中途的贪心生成样例（只用于观察，不影响随机状态）。"""
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    context = model.cfg["context_length"] if hasattr(model, "cfg") else idx.shape[1] + max_new_tokens
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(idx[:, -context:])[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, next_id], dim=1)
    model.train()
    return tokenizer.decode(idx[0, -max_new_tokens:].tolist())


def _unique_state_dict(model):
    """state_dict 去掉共享权重的重复项（权重共享时 out_head.weight 与 tok_emb.weight 是同一块内存）。"""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else (name,)
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach().contiguous().cpu()
    return state


def _optimizer_path(path):
    return Path(path).with_suffix(".optim.pt")


def _atomic_write(path, write):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # 原子改名：文件要么是旧的完整版本，要么是新的完整版本
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, model, optimizer=None, step=0, extra=None):
    """权重存为 safetensors（元数据里有 step、模型配置 config 与 JSON 形式的 extra）；
    给出 optimizer 时其状态另存为同名的 .optim.pt（torch.save 纯张量与基本类型，可用 weights_only=True 读回）。"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"step": str(int(step)), "extra": json.dumps(extra or {})}
    if hasattr(model, "cfg"):
        metadata["config"] = json.dumps(model.cfg)
    if optimizer is not None:  # 先写优化器，再写权重：两者的 step 在读取时互相核对
        state = {"step": int(step), "optimizer": optimizer.state_dict()}
        _atomic_write(_optimizer_path(path), lambda tmp: torch.save(state, tmp))
    _atomic_write(path, lambda tmp: save_file(_unique_state_dict(model), str(tmp), metadata=metadata))


def read_checkpoint_metadata(path):
    """只读元数据：返回 {"step": int, "config": dict 或 None, "extra": dict}。"""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"step": int(meta.get("step", 0)), "config": json.loads(meta["config"]) if "config" in meta else None,
            "extra": json.loads(meta.get("extra", "{}"))}


def load_checkpoint(path, model, optimizer=None, strict=True):
    """把 save_checkpoint 保存的权重（以及可选的优化器状态）读回，返回 read_checkpoint_metadata 的结果。

    形状不符、缺少或多出张量时抛出 ValueError，并写明是哪个张量。
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"找不到检查点文件 {path.name}")
    state = load_file(str(path))
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            if strict:
                raise ValueError(f"检查点里的张量 {name!r} 在模型中不存在（模型结构不同？）")
        elif own[name].shape != tensor.shape:
            raise ValueError(f"张量 {name!r} 形状不符：检查点 {tuple(tensor.shape)}，模型 {tuple(own[name].shape)}"
                             "（检查点来自不同的模型配置？）")
    saved_ptrs = {own[n].data_ptr() for n in state if n in own}
    missing = [n for n in own if n not in state and own[n].data_ptr() not in saved_ptrs]
    if missing and strict:
        raise ValueError(f"检查点缺少张量：{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    info = read_checkpoint_metadata(path)
    if optimizer is not None:
        opt_path = _optimizer_path(path)
        if not opt_path.exists():
            raise FileNotFoundError(f"找不到优化器状态文件 {opt_path.name}（保存时没有传入 optimizer？）")
        opt_state = torch.load(opt_path, map_location="cpu", weights_only=True)
        if opt_state["step"] != info["step"]:
            raise ValueError(f"优化器状态（step {opt_state['step']}）与权重（step {info['step']}）不是同一次保存的")
        optimizer.load_state_dict(opt_state["optimizer"])
    return info


def ch05_checkpoint_path(profile=PROFILE):
    """第 5 章在该配置档下训练出的基础模型的路径（第 6、7 章在没有 GPT-2 权重时从它开始）。"""
    return checkpoint_dir() / f"ch05_gpt_{profile}.safetensors"


def load_ch05_model(profile=PROFILE, device="cpu"):
    """读取第 5 章保存的模型，返回 (model, cfg)，模型处于 eval 模式；文件不存在时返回 None。"""
    path = ch05_checkpoint_path(profile)
    if not path.exists():
        return None
    cfg = read_checkpoint_metadata(path)["config"]
    if cfg is None:
        raise ValueError(f"{path.name} 的元数据里没有模型配置，无法重建模型")
    model = GPTModel(cfg)
    load_checkpoint(path, model)
    return model.to(device).eval(), cfg
