"""分布式数据并行 (DistributedDataParallel, DDP)：在 Tiny Shakespeare 上训练课程的 GPT。

每个进程 (rank) 持有一份完整的模型，读取数据的不同部分；反向传播时 DDP 把各 rank 的梯度
all-reduce 成平均值，于是所有 rank 做出完全相同的参数更新。讲解见 ``01_pytorch/bonus_ddp.ipynb``。

用法（在仓库根目录）::

    torchrun --standalone --nproc-per-node=2 01_pytorch/ddp_train.py --steps 20 --batch-size 4
    python 01_pytorch/ddp_train.py --batch-size 8        # 单进程：不需要 torchrun

CPU 上用 ``gloo`` 后端，CUDA 上用 ``nccl``（每个进程一块 GPU）。只有 rank 0 打印日志、写检查点和
``--out`` 指定的 JSON（损失、学习率、吞吐量、各 rank 的参数指纹与一致性检查）。
"""
import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from shared.checkpoint import save_checkpoint
from shared.data import TokenWindows
from shared.download import TINY_SHAKESPEARE, read_text
from shared.model import GPTModel, config_for_profile
from shared.runtime import atomic_write, checkpoint_dir, get_profile, set_seed
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import autocast, calc_loss_batch, configure_optimizer, cosine_schedule, endless_batches, train_loop

DEFAULT_STEPS = {"tiny": 5, "cpu": 30, "gpu": 200}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDP 训练课程的 GPT（Tiny Shakespeare）")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS[get_profile()], help="优化器更新的步数")
    p.add_argument("--batch-size", type=int, default=4, help="每个 rank、每个微批次的样本数")
    p.add_argument("--grad-accum", type=int, default=1, help="梯度累积的微批次数")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--lr", type=float, default=1e-3, help="最大学习率（余弦调度）")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="每个进程的 CPU 线程数（默认沿用 OMP_NUM_THREADS）")
    p.add_argument("--out", type=Path, default=None, help="rank 0 把结果写成 JSON 的路径")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="rank 0 保存 safetensors 检查点的路径（默认在 checkpoint_dir() 下）")
    p.add_argument("--no-checkpoint", action="store_true", help="不保存检查点")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} 必须是正整数，收到 {getattr(args, name)}")
    return args


def setup_distributed():
    """torchrun 为每个进程设置 RANK / LOCAL_RANK / WORLD_SIZE；没有这些变量时按单进程运行。

    返回 (rank, world_size, device)。CUDA 上每个进程用第 LOCAL_RANK 块 GPU 和 nccl，CPU 上用 gloo。
    """
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def global_mean(value, world_size):
    """所有 rank 上的标量取平均（all-reduce 求和再除以进程数），返回 Python float。"""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return value.item()


def flat_params(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def check_params_identical(model, world_size):
    """每个 rank 算参数的 sha256 指纹并 all-gather；再把 rank 0 的参数广播过来求最大差值。"""
    flat = flat_params(model)
    digest = hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()
    if world_size == 1:
        return [digest], 0.0
    digests = [None] * world_size
    dist.all_gather_object(digests, digest)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    max_diff = (flat - reference).abs().max()
    dist.all_reduce(max_diff, op=dist.ReduceOp.MAX)
    return digests, max_diff.item()


def step_indices(sampler, batch_size, grad_accum, steps):
    """本 rank 在每一步用到的样本下标（只看第 0 轮，供笔记本和测试核对数据切分）。"""
    sampler.set_epoch(0)
    order = list(iter(sampler))
    per_step = batch_size * grad_accum
    return [order[s * per_step:(s + 1) * per_step] for s in range(min(steps, len(order) // per_step))]


def train(args, rank, world_size, device):
    profile = get_profile()
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)  # 各 rank 同一种子；DDP 构造时还会把 rank 0 的参数广播给所有 rank

    cfg = dict(config_for_profile(profile), drop_rate=0.0)  # dropout=0：单进程与多进程才能逐步对比
    token_ids = get_gpt2_tokenizer().encode(read_text(TINY_SHAKESPEARE))
    dataset = TokenWindows(token_ids, cfg["context_length"], stride=cfg["context_length"])  # 第 5 章的数据集
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader) // args.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"数据太少：每个 rank 只有 {len(loader)} 个批次，不够一次 {args.grad_accum} 步的梯度累积")

    model = GPTModel(cfg).to(device)
    raw_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw_model, lr=args.lr, weight_decay=args.weight_decay,
                                    betas=(0.9, 0.95), fused=device.type == "cuda")

    tokens_per_step = world_size * args.batch_size * args.grad_accum * cfg["context_length"]
    log(f"world_size={world_size} | backend={dist.get_backend() if world_size > 1 else 'none'} | "
        f"device={device.type} | threads/proc={torch.get_num_threads()}")
    log(f"每个 rank 的批次 {args.batch_size} x 梯度累积 {args.grad_accum} x {world_size} 个进程 "
        f"= 全局批次 {args.batch_size * args.grad_accum * world_size} 个样本 ({tokens_per_step} tokens)/步")

    indices = step_indices(sampler, args.batch_size, args.grad_accum, args.steps)
    losses, lrs, timer = [], [], {}

    def on_step(done, loss, lr):
        """第 5 章 train_loop 每步之后调用：记录全局平均损失；第 0 步含内存分配等一次性开销，吞吐量从第 1 步之后算起。"""
        losses.append(global_mean(torch.tensor(loss, device=device), world_size))
        lrs.append(lr)
        log(f"step {done - 1:3d} | lr {lr:.2e} | loss {losses[-1]:.4f}", flush=True)
        if done == 1:
            if world_size > 1:
                dist.barrier()
            timer["start"] = time.perf_counter()

    # GPU 上用 bf16 自动混合精度；CPU 上保持 float32（便于逐位比较单进程与多进程）
    amp = autocast(device, torch.bfloat16 if device.type == "cuda" else None)
    # 优化步与第 5 章完全相同（梯度累积时 DDP 只在最后一个微批次同步梯度，见 train_step），只换了数据与记录
    train_loop(model, optimizer, endless_batches(loader), lambda batch: calc_loss_batch(*batch, model, device),
               range(args.steps), lr_at=cosine_schedule(args.lr, max(1, args.steps // 10), args.steps),
               grad_accum_steps=args.grad_accum, grad_clip=1.0, amp=amp, on_step=on_step, progress=False)
    if world_size > 1:
        dist.barrier()
    start = timer.get("start")
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    tokens_per_s = tokens_per_step * (args.steps - 1) / elapsed if start is not None else float("nan")
    log(f"吞吐量 {tokens_per_s:,.0f} tokens/s（全部进程合计，不含第 0 步）")

    digests, max_diff = check_params_identical(raw_model, world_size)
    params_equal = len(set(digests)) == 1 and max_diff == 0.0
    if world_size > 1:
        log(f"各 rank 参数逐位相同: {params_equal}（all-gather 指纹 + 与 rank 0 的最大差值 {max_diff:.1e}）")

    all_indices = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(all_indices, indices)
    else:
        all_indices = [indices]

    if rank == 0:
        ckpt = None
        if not args.no_checkpoint:
            ckpt = args.checkpoint or checkpoint_dir() / f"ddp_gpt_{profile}.safetensors"
            save_checkpoint(ckpt, raw_model, optimizer, step=args.steps,
                            extra={"world_size": world_size, "global_batch": world_size * args.batch_size * args.grad_accum})
        result = dict(
            world_size=world_size, backend=dist.get_backend() if world_size > 1 else None, profile=profile,
            per_rank_batch=args.batch_size, grad_accum=args.grad_accum,
            global_batch=world_size * args.batch_size * args.grad_accum, context_length=cfg["context_length"],
            steps=args.steps, threads_per_proc=torch.get_num_threads(), num_params=flat_params(raw_model).numel(),
            losses=losses, lrs=lrs, tokens_per_s=tokens_per_s, elapsed_s=elapsed,
            param_sha256=digests, params_equal=params_equal, max_param_diff=max_diff,
            sample_indices=all_indices, checkpoint=ckpt.name if ckpt else None,
        )
        if args.out is not None:
            atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=1), encoding="utf-8"))
    if world_size > 1:
        dist.barrier()  # 其他 rank 等 rank 0 写完再一起退出


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    try:
        train(args, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # 出错时也要释放通信资源，否则其他进程可能一直挂起


if __name__ == "__main__":
    main()
