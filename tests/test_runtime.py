"""shared.runtime：配置档、设备、种子、eval_mode、原子写入、进度条，以及 import shared 不导入 torch。"""
import contextlib
import io
import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from shared import runtime


@pytest.mark.parametrize("value, expected", [("tiny", "tiny"), ("cpu", "cpu"), ("gpu", "gpu"), (" CPU ", "cpu")])
def test_known_profiles_accepted(monkeypatch, value, expected):
    monkeypatch.setenv("LLM_PROFILE", value)
    assert runtime.get_profile() == expected
    assert runtime.get_profile(value) == expected  # 显式给出的配置档同样校验


def test_unknown_profile_rejected_with_clear_message(monkeypatch):
    monkeypatch.setenv("LLM_PROFILE", "huge")
    with pytest.raises(ValueError, match=r"LLM_PROFILE='huge'.*tiny, cpu, gpu"):
        runtime.get_profile()
    with pytest.raises(ValueError, match=r"'big'"):
        runtime.get_profile("big")


@pytest.mark.parametrize("cuda, expected", [(True, "gpu"), (False, "cpu")])
def test_default_profile_follows_cuda(monkeypatch, cuda, expected):
    monkeypatch.delenv("LLM_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert runtime.get_profile() == expected


def test_profile_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("LLM_PROFILE", "tiny")
    assert runtime.get_profile() == "tiny"
    monkeypatch.setenv("LLM_PROFILE", "cpu")
    assert runtime.get_profile() == "cpu"


def test_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("cuda")
    assert runtime.get_device("cpu") == torch.device("cpu")


def test_set_seed_reproducible():
    runtime.set_seed(7)
    a = (torch.rand(3), torch.randn(2, 2))
    runtime.set_seed(7)
    b = (torch.rand(3), torch.randn(2, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    runtime.set_seed(8)
    assert not torch.equal(torch.rand(3), a[0])


def test_checkpoint_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    assert runtime.checkpoint_dir() == tmp_path / "ckpt"
    assert (tmp_path / "ckpt").is_dir()


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_restores_mode_even_after_an_error(start_training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train(start_training)
    with runtime.eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training == start_training
    with pytest.raises(RuntimeError, match="boom"):
        with runtime.eval_mode(model):
            raise RuntimeError("boom")
    assert model.training == start_training and model[1].training == start_training


def test_atomic_write_replaces_and_syncs(tmp_path, monkeypatch):
    synced = []  # 每次 fsync 的对象是不是普通文件（另一种是目录）
    real_fsync = os.fsync
    monkeypatch.setattr(runtime.os, "fsync",
                        lambda fd: synced.append(stat.S_ISREG(os.fstat(fd).st_mode)) or real_fsync(fd))
    path = tmp_path / "sub" / "out.txt"
    assert runtime.atomic_write(path, lambda tmp: tmp.write_text("first")) == path
    runtime.atomic_write(path, lambda tmp: tmp.write_text("second"))
    assert path.read_text() == "second"
    assert synced.count(True) == 2  # 每次写入都 fsync 了文件内容
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]  # 不留临时文件


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runtime.atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_progress_bar_refreshes_only_a_few_times():
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):  # 把进度条写进字符串，数刷新次数
        bar = runtime.progress_bar(range(1000), desc="x")
        for _ in bar:
            pass
        bar.close()
    assert bar.miniters == 100 and bar.mininterval >= 0.5  # 至多每 1/10 的进度、每 0.5 秒刷新一次
    assert bar.maxinterval == float("inf")  # 慢的循环（两次刷新相隔 10 秒以上）也不会被 tqdm 改回每步刷新
    assert 2 <= stream.getvalue().count("\r") <= 15
    assert runtime.progress_bar(range(3), disable=True).disable


def test_import_shared_and_export_do_not_import_torch():
    code = ("import sys, shared, shared.runtime, shared.export; "
            "shared.export.stale_modules(); print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, LLM_PROFILE="not-a-profile")).stdout
    assert out.split() == ["False", "False"]  # 也不校验配置档：错误的 LLM_PROFILE 不影响导入


@pytest.mark.parametrize("value, allowed", [(None, False), ("", False), ("0", False), ("no", False),
                                            ("1", True), ("true", True), (" YES ", True)])
def test_download_allowed_reads_the_switch(monkeypatch, value, allowed):
    if value is None:
        monkeypatch.delenv("LLM_ALLOW_DOWNLOAD", raising=False)
    else:
        monkeypatch.setenv("LLM_ALLOW_DOWNLOAD", value)
    assert runtime.download_allowed() is allowed


@pytest.mark.parametrize("value, expected", [("", None), ("7", 7 * 2**30), (" 7.5 ", int(7.5 * 2**30))])
def test_gpu_memory_override(monkeypatch, value, expected):
    monkeypatch.setenv("LLM_GPU_MEMORY_GB", value)
    assert runtime.gpu_memory_override() == expected


@pytest.mark.parametrize("value", ["0", "-1", "eight", "nan", "8GB"])
def test_gpu_memory_override_rejects_nonsense(monkeypatch, value):
    monkeypatch.setenv("LLM_GPU_MEMORY_GB", value)
    with pytest.raises(ValueError, match="不是有效的显存大小；请写以 GiB 为单位的正数"):
        runtime.gpu_memory_override()
