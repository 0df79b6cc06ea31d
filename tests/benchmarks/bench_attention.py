"""手写 MultiHeadAttention 与 F.scaled_dot_product_attention（融合快速路径）的前向速度对比。

用法：python tests/benchmarks/bench_attention.py [--device cpu|cuda] [--repeats 20]
输出一个 JSON 对象：每个序列长度下两种实现的每次前向毫秒数及加速比。
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from shared.attention import MultiHeadAttention


def sdpa_forward(mha, x):
    b, T, _ = x.shape
    split = lambda t: t.view(b, T, mha.num_heads, mha.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(mha.W_query(x)), split(mha.W_key(x)), split(mha.W_value(x))
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return mha.out_proj(context.transpose(1, 2).reshape(b, T, mha.d_out))


def time_ms(fn, device, repeats):
    fn()  # 预热
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    lengths = [64, 128, 256, 512]
    mha = MultiHeadAttention(args.d_model, args.d_model, max(lengths), 0.0, args.heads).to(device).eval()
    results = []
    with torch.no_grad():
        for T in lengths:
            x = torch.randn(args.batch, T, args.d_model, device=device)
            ours = time_ms(lambda: mha(x), device, args.repeats)
            fused = time_ms(lambda: sdpa_forward(mha, x), device, args.repeats)
            max_err = (mha(x) - sdpa_forward(mha, x)).abs().max().item()
            results.append({"T": T, "ours_ms": round(ours, 3), "sdpa_ms": round(fused, 3),
                            "speedup": round(ours / fused, 2), "max_abs_err": max_err})
    print(json.dumps({"benchmark": "attention_forward", "device": str(device), "threads": torch.get_num_threads(),
                      "batch": args.batch, "d_model": args.d_model, "heads": args.heads,
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
