"""shared.doctor：本机上真的跑一次 ``python -m shared.doctor``，再用模拟的事实逐项检查每个判断。"""
import os
import subprocess
import sys

import pytest
import torch

from shared import doctor
from shared.doctor import FAIL, OK, WARN
from shared.download import DownloadError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # CUDA 12.8 之前的构建，没有 sm_120


def run_doctor(**env):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **env}
    return subprocess.run([sys.executable, "-m", "shared.doctor"], cwd=REPO, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)


def test_doctor_runs_on_this_machine():
    proc = run_doctor()
    out = proc.stdout
    assert proc.stderr == ""
    for header in ("检查项", "状态", "结果 / 修复建议"):
        assert header in out.splitlines()[0]
    for item in ("Python", "PyTorch", "CUDA", "bf16", "torch.compile", "磁盘空间", "LLM_PROFILE", "GPT-2 分词器"):
        assert item in out
    assert torch.__version__ in out
    failed = [line for line in out.splitlines() if f" {FAIL} " in line]
    assert proc.returncode == (1 if failed else 0), out


def test_doctor_exits_1_on_a_failed_check():
    proc = run_doctor(LLM_PROFILE="huge")
    assert proc.returncode == 1
    assert "LLM_PROFILE='huge'" in proc.stdout and "1 项必须修复" in proc.stdout


@pytest.mark.parametrize("version, status", [((3, 9), FAIL), ((3, 10), OK), ((3, 12), OK), ((2, 11), FAIL)])
def test_python_version(version, status):
    assert doctor.check_python(version, ">=3.10").status == status  # (3, 9) < (3, 10)：按数字比较，不是按字符串


def test_rtx50_on_an_old_build_fails_with_cu128_fix():
    row = doctor.check_gpu("NVIDIA GeForce RTX 5060", 7.96, (12, 0), OLD_ARCHS)
    assert row.status == FAIL
    assert "no kernel image" in row.result and "sm_120" in row.result and "8.0 GB" in row.result
    assert "https://download.pytorch.org/whl/cu128" in row.fix


@pytest.mark.parametrize("capability, archs, status", [
    ((12, 0), OLD_ARCHS + ["sm_100", "sm_120"], OK),
    ((12, 0), OLD_ARCHS + ["compute_90"], OK),   # PTX 向前兼容：驱动把 compute_90 即时编译给 sm_120
    ((8, 6), ["sm_80", "sm_90", "compute_90"], OK),  # sm_80 的二进制能在同主版本的 8.6 上跑
    ((8, 6), ["sm_90", "compute_90"], FAIL),     # 比设备新的二进制与 PTX 都不行
    ((9, 0), ["sm_80", "sm_86"], FAIL),          # 二进制不跨主版本
    ((8, 0), ["sm_86"], FAIL),
    ((7, 5), OLD_ARCHS, OK),
])
def test_gpu_kernel_compatibility(capability, archs, status):
    assert doctor.check_gpu("GPU", 8.0, capability, archs).status == status


def test_old_gpu_without_kernels_points_to_pytorch_org():
    row = doctor.check_gpu("Tesla K80", 11.2, (3, 7), ["sm_50", "sm_90"])
    assert row.status == FAIL and "sm_37" in row.fix and "pytorch.org" in row.fix


@pytest.mark.parametrize("available, torch_cuda, driver, status, fix", [
    (True, "12.8", True, OK, ""),
    (False, None, False, OK, ""),
    (False, None, True, WARN, "whl/cu128"),  # 有驱动却装了 CPU 版 torch
    (False, "12.8", True, WARN, "驱动"),
])
def test_cuda(available, torch_cuda, driver, status, fix):
    row = doctor.check_cuda(available, torch_cuda, driver)
    assert row.status == status and fix in row.fix and bool(row.fix) == bool(fix)


def test_bf16():
    assert doctor.check_bf16("cuda", True).status == OK
    assert doctor.check_bf16("cuda", False).status == WARN
    cpu = doctor.check_bf16("cpu")
    assert cpu.status == OK and "bf16 autocast 可用" in cpu.result and "取决于处理器" in cpu.result


@pytest.mark.parametrize("system, device, triton, compiler, status, fix", [
    ("Windows", "cuda", False, "cl", WARN, "pip install triton-windows"),
    ("Linux", "cuda", False, "gcc", WARN, "pip install triton"),
    ("Windows", "cuda", True, None, OK, ""),
    ("Linux", "cpu", False, "g++", OK, ""),
    ("Linux", "cpu", False, None, WARN, "g++"),
    ("Windows", "cpu", False, None, WARN, "Visual Studio Build Tools"),
])
def test_compile(system, device, triton, compiler, status, fix):
    row = doctor.check_compile(system, device, triton, compiler)
    assert row.status == status and fix in row.fix and bool(row.fix) == bool(fix)
    if system == "Linux":
        assert "windows" not in row.fix


@pytest.mark.parametrize("free_gb, status", [(0.3, WARN), (4.9, WARN), (5.0, OK), (120.0, OK)])
def test_disk(free_gb, status):
    row = doctor.check_disk(free_gb)
    assert row.status == status and f"{free_gb:.1f} GB" in row.result
    assert ("5 GB" in row.fix) == (status == WARN)


def test_profile(monkeypatch):
    bad = doctor.check_profile("huge")
    assert bad.status == FAIL and "'huge'" in bad.result and "tiny, cpu, gpu" in bad.result
    assert "export LLM_PROFILE=cpu" in bad.fix
    assert doctor.check_profile("gpu") == doctor.Row("LLM_PROFILE", "gpu", OK)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert doctor.check_profile("") == doctor.Row("LLM_PROFILE", "未设置，默认 cpu", OK)


def test_folder(tmp_path):
    assert doctor.check_folder("LLM_MIRROR", None, FAIL).status == OK
    assert doctor.check_folder("LLM_MIRROR", tmp_path, FAIL) == doctor.Row("LLM_MIRROR", str(tmp_path), OK)
    missing = doctor.check_folder("LLM_MIRROR", tmp_path / "nope", FAIL)
    assert missing.status == FAIL and "不存在" in missing.result and "LLM_MIRROR" in missing.fix
    assert doctor.check_folder("TIKTOKEN_CACHE_DIR", tmp_path / "nope", WARN).status == WARN


def test_tokenizer():
    def broken():
        raise DownloadError("无法加载 GPT-2 分词器：没有缓存\n  怎么办：……")

    row = doctor.check_tokenizer(broken)
    assert row.status == FAIL and row.result == "无法加载 GPT-2 分词器：没有缓存"
    assert "TIKTOKEN_CACHE_DIR" in row.fix and "联网" in row.fix

    class Encoding:
        n_vocab = 50257

    assert doctor.check_tokenizer(Encoding) == doctor.Row("GPT-2 分词器", "可以加载（词表 50257）", OK)


def test_gpu_budget(monkeypatch):
    monkeypatch.delenv("LLM_GPU_MEMORY_GB", raising=False)
    assert doctor.check_gpu_budget(None).status == OK and "不适用" in doctor.check_gpu_budget(None).result
    assert doctor.check_gpu_budget(7.6) == doctor.Row("显存预算", "空闲 7.6 GiB（设置 LLM_GPU_MEMORY_GB 可改写）", OK)
    assert doctor.check_gpu_budget(5.0).status == WARN                      # 桌面占着显存，只剩 5 GiB
    monkeypatch.setenv("LLM_GPU_MEMORY_GB", "11.5")
    assert doctor.check_gpu_budget(7.6).result == "11.5 GiB（来自 LLM_GPU_MEMORY_GB）"
    monkeypatch.setenv("LLM_GPU_MEMORY_GB", "-3")
    row = doctor.check_gpu_budget(7.6)
    assert row.status == FAIL and "LLM_GPU_MEMORY_GB='-3'" in row.result and "7.5" in row.fix


def test_doctor_prints_the_budget_it_will_use():
    out = run_doctor(LLM_GPU_MEMORY_GB="6.5").stdout
    assert "显存预算" in out and "6.5 GiB（来自 LLM_GPU_MEMORY_GB" in out
