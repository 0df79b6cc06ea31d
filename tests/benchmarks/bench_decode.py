"""批大小 1 的生成速度：GPT-2 124M 形状（随机权重），16 个 token 的提示词，贪心生成 --new-tokens 个 token，带 KV 缓存。

比较 fp32、bf16 权重、从零实现的 int8 权重量化（shared.quant.quantize_model；int8_fused 再加 use_fused_ops）
与 transformers 的 GPT2LMHeadModel.generate
（fp32，由 export_gpt2_to_hf 导出同一组权重）。各方式交替运行 --rounds 轮，取中位数。
精度：int8 与 fp32 在第 5 章的 Tiny Shakespeare 验证集上的困惑度之比（起点模型同第 6、7 章：GPT-2 124M 或第 5 章检查点）。
输出一个 JSON 对象：fp32_tok_s、bf16_tok_s、int8_tok_s、hf_tok_s、int8_ppl_ratio 以及线程数与负载。
用法：python tests/benchmarks/bench_decode.py [--new-tokens 200] [--rounds 3]
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from bench_kv_cache import to_hf_gpt2  # 同目录的脚本：直接运行本文件时它在 sys.path 上

from shared.download import TINY_SHAKESPEARE, read_text
from shared.finetune import load_base_model
from shared.generate import generate
from shared.model import GPTModel, model_config
from shared.perf import use_fused_ops
from shared.quant import quantize_model
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import calc_loss_loader, token_loader


def hf_generator(model, prompt, n):
    with tempfile.TemporaryDirectory() as folder:
        hf = to_hf_gpt2(model, folder)  # 与 bench_kv_cache 同一个导出与设置（不让 EOS 提前停止）
    return lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, use_cache=True)


def int8_ppl_ratio():
    model, cfg, source = load_base_model(device="cpu")
    text = read_text(TINY_SHAKESPEARE)
    ids = torch.tensor(get_gpt2_tokenizer().encode(text[int(0.9 * len(text)):]))
    loader = token_loader(ids, 4, cfg["context_length"], stride=cfg["context_length"], shuffle=False)
    with torch.inference_mode():
        fp32 = calc_loss_loader(loader, model, "cpu")
        int8 = calc_loss_loader(loader, quantize_model(copy.deepcopy(model)), "cpu")
    return float(torch.tensor(int8 - fp32).exp()), source


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(123)
    cfg = model_config("gpt2-small (124M)")
    fp32 = GPTModel(cfg).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, 16))
    n = args.new_tokens
    runners = {
        "fp32": lambda: generate(fp32, prompt, n),
        "bf16": (lambda m: lambda: generate(m, prompt, n))(copy.deepcopy(fp32).to(torch.bfloat16)),
        "int8": (lambda m: lambda: generate(m, prompt, n))(quantize_model(copy.deepcopy(fp32))),
        "int8_fused": (lambda m: lambda: generate(m, prompt, n))(use_fused_ops(quantize_model(copy.deepcopy(fp32)))),
        "hf": hf_generator(fp32, prompt, n),
    }
    speeds = {name: [] for name in runners}
    with torch.inference_mode():
        outputs = {name: run() for name, run in runners.items()}  # 预热
        for _ in range(args.rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                speeds[name].append(n / (time.perf_counter() - start))
    if not torch.equal(outputs["fp32"], outputs["hf"]):
        raise RuntimeError("fp32 与 transformers 生成的 token 不一致：权重导出或缓存有误")
    with contextlib.redirect_stdout(sys.stderr):  # load_base_model 会打印它选了哪个起点模型；标准输出只留 JSON
        ratio, source = int8_ppl_ratio()
    med = {name: statistics.median(v) for name, v in speeds.items()}
    print(json.dumps({
        "benchmark": "decode", "model": "gpt2-small (124M) shape, random weights", "new_tokens": n, "prompt_tokens": 16,
        **{f"{name}_tok_s": round(med[name], 2) for name in runners},
        "fp32_vs_hf": round(med["fp32"] / med["hf"], 2), "int8_vs_hf": round(med["int8"] / med["hf"], 2),
        "int8_fused_vs_hf": round(med["int8_fused"] / med["hf"], 2),
        "bf16_vs_hf": round(med["bf16"] / med["hf"], 2),
        "int8_ppl_ratio": round(ratio, 4), "ppl_model": source,
        "all": {name: [round(v, 2) for v in values] for name, values in speeds.items()},
        "fused_int8_kernel": hasattr(torch, "_weight_int8pack_mm"),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 1),
        "torch": torch.__version__,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
