"""超参数搜索：随机抽样 + 逐次减半 (successive halving)，结果逐条原子地追加到 JSONL、中断后续跑；
命令行 `python -m shared.tune --out runs/tune.jsonl`，在 05_pretraining/bonus_monitoring_and_tuning 中讲解。"""
import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .download import TINY_SHAKESPEARE, read_text
from .model import GPTModel
from .runtime import atomic_write, set_seed
from .train import configure_optimizer, token_loader, train_model

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_monitoring_and_tuning.ipynb ----
CHAR_GPT = dict(context_length=64, emb_dim=96, n_layers=4, n_heads=4, drop_rate=0.0, qkv_bias=False, tie_weights=True)


@functools.cache
def char_data(chars=None):
    """Tiny Shakespeare 的前 chars 个字符（None 为全部），字符级编码、9:1 划分：(训练 id, 验证 id, 字符表)。"""
    text = read_text(TINY_SHAKESPEARE)[:chars]
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], vocab


SEARCH_SPACE = {  # 名字 -> ("log", 下限, 上限) 对数均匀 / ("uniform", 下限, 上限) / ("choice", [候选值])
    "lr": ("log", 3e-4, 3e-2),
    "warmup_frac": ("uniform", 0.0, 0.2),
    "weight_decay": ("choice", [0.0, 0.01, 0.1, 0.3]),
    "batch_size": ("choice", [8, 16, 32]),
}


def sample_trials(space, n, seed=0):
    """从搜索空间独立地抽 n 组超参数；同样的 (space, n, seed) 总是得到同样的试验，续跑才能对上号。"""
    rng = np.random.default_rng(seed)

    def draw(name, spec):
        kind, *args = spec
        if kind == "log":
            return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
        if kind == "uniform":
            return float(rng.uniform(args[0], args[1]))
        if kind == "choice":
            return args[0][int(rng.integers(len(args[0])))]
        raise ValueError(f"{name}：未知的分布 {kind!r}（应为 'log'、'uniform' 或 'choice'）")

    return [{name: draw(name, spec) for name, spec in space.items()} for _ in range(n)]


def read_results(path):
    """JSONL 结果文件 -> 记录的列表；文件不存在时返回空列表。"""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_result(path, record):
    """把一条记录追加到 JSONL：新内容先写临时文件再改名（atomic_write），进程在任何时刻被杀，文件都是完整的旧版或新版。"""
    old = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(old + line, encoding="utf-8"))


def rung_budgets(min_budget, max_budget, eta=3):
    """逐次减半各轮的预算：min_budget, min_budget·eta, …，不超过 max_budget。"""
    if not (1 <= min_budget <= max_budget and eta >= 2):
        raise ValueError(f"需要 1 <= min_budget ({min_budget}) <= max_budget ({max_budget}) 且 eta ({eta}) >= 2")
    budgets = [min_budget]
    while budgets[-1] * eta <= max_budget:
        budgets.append(budgets[-1] * eta)
    return budgets


def successive_halving(objective, space, n_trials, min_budget, max_budget, eta=3, results_path=None, seed=0,
                       log=print):
    """随机抽 n_trials 组超参数，逐次减半：每轮对存活的试验调用 objective(params, budget) -> 验证损失（越小越好），
    保留最好的 1/eta（至少 1 个），预算乘以 eta。objective 抛出 FloatingPointError 时这次试验的损失记为 None（最差）。
    results_path 给出时每次试验一完成就追加一行 JSONL；再次运行时已有的 (trial, budget) 直接读出、不再训练。
    返回全部记录的 DataFrame（每次试验一行：trial, rung, budget, 超参数, val_loss, seconds）。"""
    budgets = rung_budgets(min_budget, max_budget, eta)
    trials = sample_trials(space, n_trials, seed)
    done = {(r["trial"], r["budget"]): r for r in (read_results(results_path) if results_path else [])}
    records, alive = [], list(range(n_trials))
    for rung, budget in enumerate(budgets):
        for t in alive:
            record = done.get((t, budget))
            if record is not None and record["params"] != trials[t]:
                raise ValueError(f"{results_path} 里试验 {t} 的超参数与这次抽到的不同：换了 seed 或搜索空间？请换一个结果文件")
            if record is None:
                start = time.perf_counter()
                try:
                    loss = float(objective(trials[t], budget))
                except FloatingPointError:
                    loss = math.nan
                record = {"trial": t, "rung": rung, "budget": budget, "params": trials[t],
                          "val_loss": loss if math.isfinite(loss) else None, "seconds": time.perf_counter() - start}
                if results_path:
                    append_result(results_path, record)
                log(f"rung {rung} budget {budget:5d} trial {t:3d}: val_loss {record['val_loss']}")
            records.append(record)
        score = {r["trial"]: math.inf if r["val_loss"] is None else r["val_loss"] for r in records if r["budget"] == budget}
        alive = sorted(alive, key=score.get)[:max(1, len(alive) // eta)]
    return pd.DataFrame([{k: v for k, v in r.items() if k != "params"} | r["params"] for r in records])


def char_gpt_objective(params, budget, seed=1, chars=None, eval_batches=10):
    """用 params（lr、warmup_frac、weight_decay、batch_size）训练字符级小 GPT budget 步，返回验证损失 (nats/字符)。"""
    train_ids, val_ids, vocab = char_data(chars)
    set_seed(seed)
    model = GPTModel(dict(CHAR_GPT, vocab_size=len(vocab)))
    context = CHAR_GPT["context_length"]
    train_loader = token_loader(train_ids, params["batch_size"], context, context, seed=seed)
    val_loader = token_loader(val_ids, 16, context, context, shuffle=False)
    optimizer = configure_optimizer(model, lr=params["lr"], weight_decay=params["weight_decay"])
    history = train_model(model, train_loader, val_loader, optimizer, "cpu", max_steps=budget, eval_every=budget,
                          eval_batches=eval_batches, max_lr=params["lr"],
                          warmup_steps=round(params["warmup_frac"] * budget), seed=seed, progress=False)
    return history["val_loss"][-1]


def synthetic_objective(params, budget, delay=0.0):
    """测试用的目标：最优在 lr = 1e-3、weight_decay = 0.1，预算越多损失越低（对所有试验相同）；delay 秒模拟训练时间。"""
    time.sleep(delay)
    return (math.log10(params["lr"]) + 3) ** 2 + (params["weight_decay"] - 0.1) ** 2 + 1 / budget


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m shared.tune",
                                     description="随机搜索 + 逐次减半；结果逐条追加到 JSONL，中断后重跑同一条命令会接着做")
    parser.add_argument("--out", required=True, help="结果文件（JSONL）")
    parser.add_argument("--objective", choices=["char-gpt", "synthetic"], default="char-gpt")
    parser.add_argument("--trials", type=int, default=27)
    parser.add_argument("--min-budget", type=int, default=20, help="第一轮每个试验的训练步数")
    parser.add_argument("--max-budget", type=int, default=180)
    parser.add_argument("--eta", type=int, default=3, help="每轮保留 1/eta，预算乘以 eta")
    parser.add_argument("--seed", type=int, default=0, help="决定抽到哪些超参数")
    parser.add_argument("--chars", type=int, default=None, help="char-gpt：只用前这么多个字符")
    parser.add_argument("--delay", type=float, default=0.0, help="synthetic：每次试验等待的秒数")
    args = parser.parse_args(argv)
    if args.objective == "char-gpt":
        objective = functools.partial(char_gpt_objective, chars=args.chars)
    else:
        objective = functools.partial(synthetic_objective, delay=args.delay)
    table = successive_halving(objective, SEARCH_SPACE, args.trials, args.min_budget, args.max_budget, args.eta,
                               results_path=args.out, seed=args.seed)
    final = [r for r in read_results(args.out) if r["budget"] == table.budget.max() and r["val_loss"] is not None]
    if final:
        print("最好的试验：", json.dumps(min(final, key=lambda r: r["val_loss"]), ensure_ascii=False))
    else:
        print("最后一轮的试验全部发散（val_loss 为 None）：请缩小学习率的范围")


if __name__ == "__main__" and "get_ipython" not in globals():  # 笔记本里 __name__ 也是 "__main__"，不能在那里运行
    main()
