"""超参数搜索：逐次减半保留真正最好的试验；结果文件被杀掉之后续跑，不重复、不丢失；不一致的续跑与错误参数明确报错。"""
import json
import math
import subprocess
import sys
import time

import pytest

from shared.runtime import REPO_ROOT
from shared.tune import (SEARCH_SPACE, read_results, rung_budgets, sample_trials, successive_halving,
                         synthetic_objective)

QUIET = dict(log=lambda message: None)


def true_loss(params):
    return synthetic_objective(params, budget=math.inf)


def test_budgets_and_rung_sizes():
    assert rung_budgets(1, 9) == [1, 3, 9] and rung_budgets(20, 180) == [20, 60, 180] and rung_budgets(5, 14) == [5]
    table = successive_halving(synthetic_objective, SEARCH_SPACE, 27, 1, 9, **QUIET)
    assert table.groupby("budget").size().to_dict() == {1: 27, 3: 9, 9: 3}


def test_successive_halving_keeps_the_best_trial():
    trials = sample_trials(SEARCH_SPACE, 27, seed=5)
    best = min(range(27), key=lambda t: true_loss(trials[t]))
    table = successive_halving(synthetic_objective, SEARCH_SPACE, 27, 1, 9, seed=5, **QUIET)
    final = table[table.budget == 9].sort_values("val_loss")
    assert final.trial.iloc[0] == best
    calls = []
    successive_halving(lambda p, b: calls.append(b) or synthetic_objective(p, b), SEARCH_SPACE, 27, 1, 9, **QUIET)
    assert sum(calls) == 27 * 1 + 9 * 3 + 3 * 9  # 每轮花费相同，远小于 27 × 9


def test_diverged_trials_rank_last(tmp_path):
    def objective(params, budget):
        if params["lr"] > 3e-3:
            raise FloatingPointError("发散")
        return synthetic_objective(params, budget)
    table = successive_halving(objective, SEARCH_SPACE, 9, 1, 3, results_path=tmp_path / "r.jsonl", **QUIET)
    assert table.val_loss.isna().any()
    assert table[table.budget == 3].val_loss.notna().all()
    assert any(r["val_loss"] is None for r in read_results(tmp_path / "r.jsonl"))


def run_cli(out, *extra, **kw):
    command = [sys.executable, "-m", "shared.tune", "--objective", "synthetic", "--trials", "9", "--min-budget", "1",
               "--max-budget", "9", "--out", str(out), *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, **kw)


def test_killed_search_resumes_without_repeating_or_losing_trials(tmp_path):
    out = tmp_path / "search.jsonl"
    proc = run_cli(out, "--delay", "0.2")
    deadline = time.monotonic() + 120  # 只是防止挂住的上限，测试不依赖它
    while len(read_results(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    before = read_results(out)
    assert 4 <= len(before) < 9 + 3 + 1, "应在搜索中途被杀掉"
    finished = run_cli(out)
    assert finished.wait(timeout=120) == 0
    after = read_results(out)
    keys = [(r["trial"], r["budget"]) for r in after]
    assert after[:len(before)] == before, "被杀之前写完的记录必须原样保留"
    assert len(keys) == len(set(keys)) == 9 + 3 + 1, "每个 (trial, budget) 恰好一行：没有重复，也没有丢失"
    reference = tmp_path / "uninterrupted.jsonl"
    assert run_cli(reference).wait(timeout=120) == 0
    strip = lambda rows: sorted((r["trial"], r["budget"], json.dumps(r["params"]), r["val_loss"]) for r in rows)  # noqa: E731
    assert strip(after) == strip(read_results(reference))


def test_resume_reads_finished_trials_instead_of_training(tmp_path):
    out = tmp_path / "r.jsonl"
    successive_halving(synthetic_objective, SEARCH_SPACE, 9, 1, 9, results_path=out, **QUIET)
    calls = []
    successive_halving(lambda p, b: calls.append(b) or 0.0, SEARCH_SPACE, 9, 1, 9, results_path=out, **QUIET)
    assert calls == []


def test_resume_with_a_different_seed_raises(tmp_path):
    out = tmp_path / "r.jsonl"
    successive_halving(synthetic_objective, SEARCH_SPACE, 3, 1, 1, results_path=out, seed=0, **QUIET)
    with pytest.raises(ValueError, match="超参数与这次抽到的不同"):
        successive_halving(synthetic_objective, SEARCH_SPACE, 3, 1, 1, results_path=out, seed=1, **QUIET)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"需要 1 <= min_budget \(10\) <= max_budget \(5\)"):
        rung_budgets(10, 5)
    with pytest.raises(ValueError, match="eta \\(1\\) >= 2"):
        rung_budgets(1, 5, eta=1)
    with pytest.raises(ValueError, match="lr：未知的分布 'normal'"):
        sample_trials({"lr": ("normal", 0, 1)}, 2)
