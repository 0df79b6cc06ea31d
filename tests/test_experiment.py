"""shared.experiment：多个种子的运行、均值 ± 标准差、差值的标准误差与误差线图。"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from shared.experiment import SEEDS, compare, errorbar_plot, format_mean_sd, mean_sd, run_seeds  # noqa: E402


def test_run_seeds_sets_each_seed_and_collects_rows():
    def run(seed):
        return {"draw": torch.rand(1).item(), "twice": 2 * seed}

    df = run_seeds(run, seeds=(5, 7), method="A")
    assert list(df.columns) == ["method", "seed", "draw", "twice"]
    assert df["method"].tolist() == ["A", "A"] and df["seed"].tolist() == [5, 7] and df["twice"].tolist() == [10, 14]
    for seed, draw in zip((5, 7), df["draw"]):  # 每次调用 run 之前都重设了种子：结果只取决于种子
        torch.manual_seed(seed)
        assert draw == torch.rand(1).item()
    assert SEEDS == (1, 2, 3)


def test_mean_sd_uses_the_sample_standard_deviation():
    df = pd.DataFrame({"method": ["A", "A", "A", "B", "B"], "acc": [0.8, 0.9, 1.0, 0.5, 0.7]})
    summary = mean_sd(df, "method", ["acc"])
    assert summary.loc["A", ("acc", "mean")] == pytest.approx(0.9)
    assert summary.loc["A", ("acc", "sd")] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / (3 - 1))
    assert summary.loc["B", ("acc", "sd")] == pytest.approx(math.sqrt(0.02))
    assert summary.loc["B", ("acc", "n")] == 2
    assert format_mean_sd(summary).loc["A", "acc"] == "90.0% ± 10.0%"


def test_compare_matches_a_hand_computation():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.86, 0.83]
    result = compare(a, b)
    se = math.sqrt(0.0004 / 3 + 0.0009 / 3)  # 样本方差 0.0004 与 0.0009
    assert result["diff"] == pytest.approx(0.09) and result["se"] == pytest.approx(se)
    assert result["clear"]  # 0.09 > 2 * 0.0208
    noisy = compare([0.90, 0.80, 0.95], [0.85, 0.88, 0.79])
    assert not noisy["clear"]  # 均值差 0.01，远小于两倍标准误差
    # 门槛正好是 2 个标准误差：se = sqrt(0.0004/3 * 2) ≈ 0.0163，差 0.030（约 1.8 se）不算，差 0.035（约 2.1 se）才算
    assert not compare([0.90, 0.92, 0.94], [0.87, 0.89, 0.91])["clear"]
    assert compare([0.90, 0.92, 0.94], [0.865, 0.885, 0.905])["clear"]
    with pytest.raises(ValueError, match="至少要 2 个种子"):
        compare([0.9], [0.8, 0.7])


def test_errorbar_plot_draws_means_spread_and_every_seed():
    df = pd.DataFrame({"start": ["p", "p", "r", "r"], "variant": ["x", "x", "x", "x"], "acc": [0.9, 0.8, 0.6, 0.7]})
    fig, ax = plt.subplots()
    errorbar_plot(ax, df, ["start", "variant"], "acc")
    bars = [p for p in ax.patches]
    assert [round(b.get_width(), 6) for b in bars] == [0.85, 0.65]  # 横条长度 = 均值
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert sorted(np.concatenate([d.get_xdata() for d in dots]).tolist()) == [0.6, 0.7, 0.8, 0.9]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["p / x", "r / x"]
    plt.close(fig)
