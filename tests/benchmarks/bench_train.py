"""训练吞吐基准：本章的 shared.train.train_model 与朴素的 Hugging Face GPT2LMHeadModel 训练循环。

两边完全相同的设置：cpu 档模型尺寸（4 层、192 维、4 头、上下文 256、词表 50257，QKV 带偏置、权重共享、无 dropout）、
同一份随机初始权重（HF 模型由 export_gpt2_to_hf 从我们的模型导出）、同一批 Tiny Shakespeare 数据（8 × 256 token/步）、
AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)、梯度裁剪 1.0、fp32。交替测量 --rounds 轮，各取中位数。
HF 用 transformers 默认的注意力实现（sdpa）；我们的默认是第 3 章手写的注意力。
另测我们在 CPU 上最快的 fp32 配置 ours_sdpa_tok_s：SDPA 注意力 + 融合的 LayerNorm/GELU（shared.perf.use_fused_ops）
+ fused AdamW（同样的损失与数据；词表补齐在 CPU 上反而更慢，见 05_pretraining/bonus_training_speed）。
ours_fast_tok_s 再加上课程 cpu 档在本机选用的混合精度（pick_autocast_dtype：bf16 明显更快才用），hf_amp_tok_s 是 HF 用同样的
autocast：同精度的对照。输出一个 JSON 对象：各配置的 tok_s（交替测量的中位数）、相对 HF fp32 的比值以及设置。
用法：python tests/benchmarks/bench_train.py [--steps 20] [--rounds 3]
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from shared.download import TINY_SHAKESPEARE, read_text
from shared.gpt2_weights import export_gpt2_to_hf
from shared.model import GPTModel, model_config
from shared.perf import use_fused_ops
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import configure_optimizer, pick_autocast_dtype, token_loader, train_model


def to_hf(model, folder):
    """用 export_gpt2_to_hf 导出我们的模型，再由 transformers 读回：两边从同一份初始权重出发。"""
    from transformers import GPT2LMHeadModel, logging

    logging.disable_progress_bar()
    return GPT2LMHeadModel.from_pretrained(export_gpt2_to_hf(model, folder))


def bench_ours(cfg, loader, steps, fused=False, amp=None):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    if fused:
        use_fused_ops(model)
    opt = configure_optimizer(model, lr=1e-3, fused=fused)
    # 评估只在开始与结束各一次，且不计入吞吐（train_model 只统计训练时间）
    history = train_model(model, loader, loader, opt, "cpu", max_steps=steps, eval_every=10**9, eval_batches=1,
                          grad_clip=1.0, autocast_dtype=amp, progress=False)
    return history["train_tokens_per_s"]


def bench_hf(cfg, loader, steps, amp=None):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = to_hf(GPTModel(cfg), folder).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    batches = iter(loader)
    tokens, seconds = 0, 0.0
    for _ in range(steps):
        x, y = next(batches)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds += time.perf_counter() - start
        tokens += x.numel()
    return tokens / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    cfg = dict(model_config("cpu"), qkv_bias=True)
    ids = torch.tensor(get_gpt2_tokenizer().encode(read_text(TINY_SHAKESPEARE)))
    loader = token_loader(ids, args.batch_size, cfg["context_length"], stride=1, shuffle=True, seed=0)
    fast_cfg = dict(cfg, sdpa=True)
    with contextlib.redirect_stdout(sys.stderr):  # 它会打印一行测速结果；标准输出只留 JSON
        amp = pick_autocast_dtype("cpu")  # 与课程 cpu 档相同：本机 bf16 明显更快才用
    runs = {
        "ours": lambda steps: bench_ours(cfg, loader, steps),
        "ours_sdpa": lambda steps: bench_ours(fast_cfg, loader, steps, fused=True),
        "ours_fast": lambda steps: bench_ours(fast_cfg, loader, steps, fused=True, amp=amp),
        "hf": lambda steps: bench_hf(cfg, loader, steps),
        "hf_amp": lambda steps: bench_hf(cfg, loader, steps, amp=amp),
    }
    for run in runs.values():
        run(2)  # 预热
    speeds = {name: [] for name in runs}
    for _ in range(args.rounds):  # 交替测量，减少机器负载波动的影响
        for name, run in runs.items():
            speeds[name].append(run(args.steps))
    med = {name: statistics.median(v) for name, v in speeds.items()}
    import transformers

    print(json.dumps({
        **{f"{name}_tok_s": round(v) for name, v in med.items()},
        "ratio": round(med["ours"] / med["hf"], 3), "sdpa_ratio": round(med["ours_sdpa"] / med["hf"], 3),
        "fast_ratio": round(med["ours_fast"] / med["hf"], 3), "fast_vs_hf_amp": round(med["ours_fast"] / med["hf_amp"], 3),
        "autocast": str(amp), "all": {name: [round(v) for v in values] for name, values in speeds.items()},
        "model": {k: cfg[k] for k in ("emb_dim", "n_layers", "n_heads", "context_length", "vocab_size")},
        "batch": [args.batch_size, cfg["context_length"]], "steps_per_round": args.steps,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 1),
        "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
