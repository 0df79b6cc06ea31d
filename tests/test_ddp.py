"""01_pytorch/ddp_train.py：2 个 CPU 进程 (gloo) 的 DDP 训练与单进程大批次训练逐步等价。"""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from shared.checkpoint import load_checkpoint, read_checkpoint_metadata
from shared.model import GPTModel
from shared.runtime import REPO_ROOT

SCRIPT = REPO_ROOT / "01_pytorch" / "ddp_train.py"
STEPS = 4
PER_RANK_BATCH = 2
GRAD_ACCUM = 2  # 两边都做梯度累积：顺带检验 no_sync 路径
# 两种运行只在浮点求和顺序上不同（梯度 all-reduce 后再平均 vs. 一次算完整个批次），float32 下
# 损失的差别约 1e-6；留出余量，容差取 1e-4（绝对值）。
LOSS_ATOL = 1e-4


def run_script(tmp_path, name, nproc, batch_size, grad_accum=GRAD_ACCUM):
    out = tmp_path / f"{name}.json"
    args = [str(SCRIPT), "--steps", str(STEPS), "--batch-size", str(batch_size), "--grad-accum", str(grad_accum),
            "--seed", "7", "--out", str(out), "--checkpoint", str(tmp_path / f"{name}.safetensors")]
    if nproc == 1:
        cmd = [sys.executable, *args]  # 不用 torchrun：脚本自己按单进程运行
    else:
        # c10d 在 localhost:0 上会绑定一个空闲端口，CI 里并行的测试不会抢同一个端口
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", *args]
    env = dict(os.environ, LLM_PROFILE="tiny", OMP_NUM_THREADS="1", LLM_CHECKPOINT_DIR=str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return {
        "ddp": run_script(tmp, "ddp", nproc=2, batch_size=PER_RANK_BATCH),
        "single": run_script(tmp, "single", nproc=1, batch_size=2 * PER_RANK_BATCH),
        "tmp": tmp,
    }


def load(runs, name):
    proc, out = runs[name]
    assert proc.returncode == 0, f"{name} 运行失败（退出码 {proc.returncode}）：\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_exit_code_and_logging_only_on_rank0(runs):
    ddp = load(runs, "ddp")
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert ddp["global_batch"] == 2 * PER_RANK_BATCH * GRAD_ACCUM
    stdout = runs["ddp"][0].stdout
    assert stdout.count("step   0 |") == 1, "只有 rank 0 应该打印日志"
    assert len(ddp["losses"]) == STEPS


def test_params_identical_across_ranks(runs):
    ddp = load(runs, "ddp")
    assert len(ddp["param_sha256"]) == 2
    assert ddp["param_sha256"][0] == ddp["param_sha256"][1]
    assert ddp["params_equal"] is True and ddp["max_param_diff"] == 0.0  # 逐位相同，容差 0


def test_same_samples_per_step(runs):
    ddp, single = load(runs, "ddp"), load(runs, "single")
    rank0, rank1 = ddp["sample_indices"]
    (reference,) = single["sample_indices"]
    assert len(reference) == STEPS
    for step in range(STEPS):
        assert set(rank0[step]).isdisjoint(rank1[step])
        assert sorted(rank0[step] + rank1[step]) == sorted(reference[step])


def test_loss_trajectory_matches_single_process(runs):
    ddp, single = load(runs, "ddp"), load(runs, "single")
    assert single["world_size"] == 1 and single["global_batch"] == ddp["global_batch"]
    assert ddp["lrs"] == single["lrs"]
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], single["losses"])]
    assert max(diffs) < LOSS_ATOL, f"损失轨迹相差 {max(diffs):.2e}，超过容差 {LOSS_ATOL}"
    assert ddp["losses"][-1] < ddp["losses"][0]  # 确实在学习


def test_checkpoint_holds_the_trained_parameters(runs):
    ddp = load(runs, "ddp")
    path = runs["tmp"] / "ddp.safetensors"
    info = read_checkpoint_metadata(path)
    assert info["step"] == STEPS and info["extra"]["world_size"] == 2
    model = GPTModel(info["config"])
    load_checkpoint(path, model)  # strict：键名不能带 DDP 的 "module." 前缀
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    assert hashlib.sha256(flat.numpy().tobytes()).hexdigest() == ddp["param_sha256"][0]


def test_error_exits_nonzero_without_hanging(tmp_path):
    # 每个 rank 的批次大于数据集：脚本在建好进程组之后报错，finally 中销毁进程组，torchrun 以非零码退出
    proc, out = run_script(tmp_path, "too_big", nproc=2, batch_size=10**6)
    assert proc.returncode != 0
    assert "数据太少" in proc.stderr + proc.stdout
    assert not out.exists()
