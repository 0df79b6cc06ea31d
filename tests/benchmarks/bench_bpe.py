"""基准：shared.bpe 的训练与编码速度（打印一个 JSON 对象；不是测试，CI 不运行）。

用法::

    LLM_MIRROR=... TIKTOKEN_CACHE_DIR=... python tests/benchmarks/bench_bpe.py

- ``simple_train_s`` / ``fast_train_s``：同一输入（The Verdict）、同一词表大小下两个训练器的秒数，``merges_equal`` 为合并是否相同；
- ``shakespeare_4096_train_s``：快速训练器在整部 Tiny Shakespeare 上训练 4,096 词表的秒数；
- ``encode_mb_s`` / ``tiktoken_encode_mb_s``：在 Tiny Shakespeare 上的编码吞吐量（冷缓存；tiktoken 单线程
  ``encode_ordinary``），``tiktoken_over_ours`` 为两者之比。
"""
import argparse
import json
import os
import time

from shared import bpe
from shared.download import THE_VERDICT, TINY_SHAKESPEARE, read_text
from shared.tokenizer import get_gpt2_tokenizer


def seconds(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-vocab", type=int, default=512, help="朴素与快速训练器比较时的词表大小")
    parser.add_argument("--repeats", type=int, default=3, help="编码测速重复次数（取最快一次）")
    args = parser.parse_args()

    verdict, shakespeare = read_text(THE_VERDICT), read_text(TINY_SHAKESPEARE)
    simple_s, simple = seconds(bpe.train_simple, verdict, args.compare_vocab)
    fast_s, fast = seconds(bpe.train_fast, verdict, args.compare_vocab)
    shakespeare_s, _ = seconds(bpe.train_fast, shakespeare, 4096)

    mb = len(shakespeare.encode("utf-8")) / 1e6
    reference = get_gpt2_tokenizer()
    ours = min(seconds(bpe.load_gpt2_bpe().encode_ordinary, shakespeare)[0] for _ in range(args.repeats))
    theirs = min(seconds(reference.encode_ordinary, shakespeare)[0] for _ in range(args.repeats))
    print(json.dumps({
        "simple_train_s": round(simple_s, 3),
        "fast_train_s": round(fast_s, 3),
        "fast_speedup": round(simple_s / fast_s, 1),
        "merges_equal": simple == fast,
        "compare_input": "the-verdict.txt",
        "compare_vocab_size": args.compare_vocab,
        "shakespeare_4096_train_s": round(shakespeare_s, 2),
        "encode_mb_s": round(mb / ours, 2),
        "tiktoken_encode_mb_s": round(mb / theirs, 2),
        "tiktoken_over_ours": round(ours / theirs, 2),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }))


if __name__ == "__main__":
    main()
