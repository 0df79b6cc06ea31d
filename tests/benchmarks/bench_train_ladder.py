"""训练提速阶梯：从 fp32 的教学实现出发，逐级叠加 gpu 配置档用到的提速手段，测每一级的吞吐与峰值内存。

级别（逐级累加，顺序同 build-nanogpt 的 A100 阶梯）：fp32 → tf32（只在 CUDA 上）→ bf16 autocast → torch.compile
→ SDPA（FlashAttention）→ 词表补齐到 64 的倍数 → fused AdamW。每级用 shared.perf.make_trainer（课程的 train_step）、同一个随机种子与同一批 Tiny Shakespeare 数据，
先预热 --warmup 步（torch.compile 在这里编译），再计时 --steps 步。某一级出错时记下错误、继续下一级。
输出一个 JSON 对象：每级的 tok_s、相对 fp32 的倍数、峰值内存（CUDA: max_memory_allocated）、按 6N+12LTd 算的 TFLOP/s。
用法：python tests/benchmarks/bench_train_ladder.py [--device cuda] [--model "gpt2-small (124M)"] [--batch 16] [--seq 1024]
"""
import argparse
import json
import os

import torch

from shared.download import TINY_SHAKESPEARE, read_text
from shared.model import model_config, train_flops_per_token
from shared.perf import make_trainer
from shared.tokenizer import get_gpt2_tokenizer

RUNGS = ["fp32", "tf32", "bf16", "compile", "sdpa", "pad_vocab", "fused_adamw"]


def run_rung(level, args, device, ids):
    on = set(RUNGS[: RUNGS.index(level) + 1])
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in on
    cfg = dict(model_config(args.model), sdpa="sdpa" in on, pad_vocab_to=64 if "pad_vocab" in on else None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = make_trainer(cfg, args.batch, args.seq, ids, device=device, amp_dtype=torch.bfloat16 if "bf16" in on else None,
                       compile="compile" in on, fused="fused_adamw" in on)
    run(args.warmup)  # torch.compile 在这里编译
    tok_s = run(args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tok_s": round(tok_s), "ms_per_step": round(args.batch * args.seq / tok_s * 1e3, 1),
            "peak_gib": peak and round(peak, 2), "tflops": round(tok_s * train_flops_per_token(cfg, args.seq) / 1e12, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="gpt2-small (124M)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rungs", default=",".join(RUNGS), help="逗号分隔的级别名（每级都包含它之前的全部手段）")
    args = parser.parse_args()
    device = torch.device(args.device)
    ids = torch.tensor(get_gpt2_tokenizer().encode(read_text(TINY_SHAKESPEARE)))
    results = {}
    for level in args.rungs.split(","):
        try:
            results[level] = run_rung(level, args, device, ids)
        except Exception as err:  # noqa: BLE001 —— 一级失败（例如没有 Triton 的 compile）不该拖垮整张表
            results[level] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        print(level, results[level], flush=True)
    base = results.get("fp32", {}).get("tok_s")
    for r in results.values():
        if base and "tok_s" in r:
            r["speedup"] = round(r["tok_s"] / base, 2)
    print(json.dumps({
        "benchmark": "train_ladder", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": args.model, "batch": [args.batch, args.seq], "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 1), "torch": torch.__version__,
        "results": results,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
