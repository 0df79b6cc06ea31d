"""多个训练种子的实验：逐个种子运行、均值 ± 标准差、两组结果之差与它的标准误差、带误差线的图，
在 05_pretraining/01_pretraining 中讲解；之后凡是要下结论的比较都用它。"""
import numpy as np
import pandas as pd

from .runtime import set_seed

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/01_pretraining.ipynb ----
SEEDS = (1, 2, 3)  # 课程里凡是要下结论的比较，至少跑这三个训练种子


def run_seeds(run, seeds=SEEDS, **labels):
    """对每个种子先 set_seed(seed)，再调用 run(seed) -> {指标名: 数值}；返回每个种子一行的 DataFrame。
    labels（例如 start="pretrained"）作为额外的列写进每一行，几组实验的结果直接拼成一张表。"""
    rows = []
    for seed in seeds:
        set_seed(seed)
        rows.append({**labels, "seed": seed, **run(seed)})
    return pd.DataFrame(rows)


def mean_sd(results, by, metrics):
    """按 by 分组，每个指标的均值 (mean)、样本标准差 (sd，ddof=1) 与种子数 (n)，列为 (指标, 统计量)。"""
    return results.groupby(by, sort=False)[list(metrics)].agg(["mean", "std", "count"]).rename(
        columns={"std": "sd", "count": "n"})


def format_mean_sd(summary, fmt="{:.1%}"):
    """把 mean_sd 的结果写成“均值 ± 标准差”的字符串表，便于阅读。"""
    metrics = dict.fromkeys(m for m, _ in summary.columns)
    return pd.DataFrame({m: [f"{fmt.format(a)} ± {fmt.format(b)}" for a, b in zip(summary[m, "mean"], summary[m, "sd"])]
                         for m in metrics}, index=summary.index)


def compare(a, b):
    """两组不同种子的结果 a、b：均值之差 diff = mean(a) - mean(b)，它的标准误差 se = sqrt(s_a²/n_a + s_b²/n_b)，
    以及 clear = |diff| > 2·se。clear 为假时，差别在种子之间的波动之内，不能下“谁更好”的结论。"""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("每组至少要 2 个种子才能估计波动")
    diff = a.mean() - b.mean()
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    return {"diff": float(diff), "se": se, "clear": bool(abs(diff) > 2 * se)}


def errorbar_plot(ax, results, by, metric, fmt="{:.1%}"):
    """每组一根横条：长度 = 各种子的均值，误差线 = ±1 个标准差，黑点 = 每个种子各自的结果。"""
    by = [by] if isinstance(by, str) else list(by)
    summary = mean_sd(results, by, [metric])
    for y, key in enumerate(summary.index):
        key = key if isinstance(key, tuple) else (key,)
        values = results.loc[np.logical_and.reduce([results[c] == k for c, k in zip(by, key)]), metric]
        mean, sd = values.mean(), values.std(ddof=1)
        ax.barh(y, mean, xerr=sd, capsize=4, color="C0", alpha=0.5)
        ax.plot(values, [y] * len(values), "o", color="black", markersize=4)
        ax.text(mean + sd, y, f"  {fmt.format(mean)} ± {fmt.format(sd)}", va="center", fontsize=8)
    ax.set_yticks(range(len(summary)), [" / ".join(map(str, k)) if isinstance(k, tuple) else str(k)
                                        for k in summary.index])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (mean ± sd over seeds; dots = single seeds)")
