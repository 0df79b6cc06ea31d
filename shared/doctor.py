"""环境体检 (doctor)：``python -m shared.doctor`` 逐项检查 Python、PyTorch、GPU、torch.compile、磁盘、环境变量与分词器。

每项检查是纯函数：参数是事实（版本号、显卡算力、架构列表……），返回一行 ``Row``，所以测试能模拟任何机器；
``gather()`` 读取本机的事实，``main()`` 打印表格，有 ✗ 时退出码为 1。几秒内完成：不编译、不测速、不探测网络
（只有分词器既没有缓存也没有镜像时，tiktoken 会像在笔记本里一样尝试下载）。
"""
import importlib.util
import os
import platform
import re
import shutil
import sys
import unicodedata
from collections import namedtuple

from .runtime import (GPU_MEMORY_ENV, HF_ENDPOINT_ENV, MIRROR_ENV, PROFILE_ENV, REPO_ROOT, TIKTOKEN_CACHE_ENV, get_device,
                      get_profile, gpu_memory_override)

OK, WARN, FAIL = "✓", "⚠", "✗"
Row = namedtuple("Row", "item result status fix", defaults=("",))
CU128 = "pip install torch --index-url https://download.pytorch.org/whl/cu128"
MIN_FREE_GB = 5  # GPT-2 权重约 0.5 GB，另有检查点、下载缓存与 torch.compile 的缓存


def check_python(version, requires):
    """version 如 (3, 11)；requires 是 pyproject.toml 的 requires-python，如 ">=3.10"。"""
    need = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    ok = tuple(version[:2]) >= need
    return Row("Python", f"{version[0]}.{version[1]}（需要 {requires}）", OK if ok else FAIL,
               "" if ok else f"安装 Python {need[0]}.{need[1]} 或更新的版本，用它重建虚拟环境")


def check_cuda(available, torch_cuda, has_driver):
    """torch_cuda：torch.version.cuda（CPU 版 torch 为 None）；has_driver：能找到 nvidia-smi。"""
    if available:
        return Row("CUDA", f"可用（torch 的 CUDA 版本 {torch_cuda}）", OK)
    if not has_driver:
        return Row("CUDA", "不可用：没有 NVIDIA 驱动，将使用 CPU（或 MPS）", OK)
    if torch_cuda is None:
        return Row("CUDA", "有 NVIDIA 驱动，但装的是 CPU 版 torch", WARN, f"换成 CUDA 版：{CU128}")
    return Row("CUDA", f"CUDA {torch_cuda} 版 torch 找不到 GPU", WARN, "更新 NVIDIA 驱动（nvidia-smi 显示的 CUDA 版本不能更低）")


def check_gpu(name, total_gb, capability, arch_list):
    """torch 能跑这块卡：列表里有同主版本、不高于它的 sm_XY，或不高于它的 PTX compute_XY（由驱动即时编译）。"""
    major, minor = capability
    archs = [(kind, int(v)) for kind, v in re.findall(r"(sm|compute)_(\d+)", " ".join(arch_list))]
    runs = any(v <= major * 10 + minor and (kind == "compute" or v // 10 == major) for kind, v in archs)
    result = f"{name}，{total_gb:.1f} GB，sm_{major}{minor}"
    if runs:
        return Row("GPU", result, OK)
    fix = (f"RTX 50 系列 (sm_120) 需要 CUDA 12.8 及以上的 torch：{CU128}" if major >= 12
           else f"按 https://pytorch.org/get-started/locally/ 安装含 sm_{major}{minor} 的 torch")
    return Row("GPU", f"{result}：这个 torch 没有它的内核，运行时会报 “no kernel image is available for execution "
               "on the device”", FAIL, fix)


def check_bf16(device_type, supported=False):
    """device_type 为 cuda 时 supported 是 torch.cuda.is_bf16_supported() 的结果。"""
    if device_type != "cuda":
        return Row("bf16", f"{device_type} 上 bf16 autocast 可用，是否更快取决于处理器，第 5 章会先测速再决定", OK)
    if supported:
        return Row("bf16", "GPU 支持 bf16，训练用 bf16 自动混合精度", OK)
    return Row("bf16", "GPU 不支持 bf16，训练会用 fp32（更慢、更占显存）", WARN, "显存不够时减小 SETTINGS 里的 batch_size")


def check_compile(system, device_type, has_triton, compiler):
    """torch.compile 的前提：GPU 上要有 Triton，CPU 上要有 C++ 编译器（compiler：找到的编译器名或 None）。"""
    if device_type == "cuda":
        if has_triton:
            return Row("torch.compile", "Triton 已安装", OK)
        package = "triton-windows" if system == "Windows" else "triton"
        return Row("torch.compile", "没有 Triton：gpu 配置档的 torch.compile 会失败", WARN, f"pip install {package}")
    if compiler:
        return Row("torch.compile", f"C++ 编译器 {compiler}（课程只在 gpu 配置档编译）", OK)
    tool = "Visual Studio Build Tools（C++ 桌面开发）" if system == "Windows" else "g++（如 apt install g++）"
    return Row("torch.compile", "没有 C++ 编译器（课程只在 gpu 配置档编译，可以忽略）", WARN, f"需要时安装 {tool}")


def check_disk(free_gb):
    ok = free_gb >= MIN_FREE_GB
    return Row("磁盘空间", f"仓库所在磁盘剩余 {free_gb:.1f} GB", OK if ok else WARN,
               "" if ok else f"腾出至少 {MIN_FREE_GB} GB：GPT-2 权重约 0.5 GB，另有检查点与下载缓存")


def check_profile(value):
    """value：LLM_PROFILE 的原值（未设置为空串）；校验与默认值都交给 runtime.get_profile。"""
    try:
        profile = get_profile(value)
    except ValueError as e:
        problem, _, fix = str(e).partition("。")  # runtime 的报错："未知的配置档…；可选值为…。例如：export …"
        return Row(PROFILE_ENV, problem, FAIL, fix or f"export {PROFILE_ENV}=cpu")
    return Row(PROFILE_ENV, profile if value.strip() else f"未设置，默认 {profile}", OK)


def check_gpu_budget(free_gib):
    """训练时守卫用的显存预算：LLM_GPU_MEMORY_GB，否则 GPU 的空闲显存 free_gib（没有 CUDA 为 None）。"""
    try:
        override = gpu_memory_override()
    except ValueError as e:
        return Row("显存预算", str(e).split("；")[0], FAIL, f"写成以 GiB 为单位的正数（如 {GPU_MEMORY_ENV}=7.5），或取消它")
    if override is not None:
        where = "" if free_gib is not None else "；没有 CUDA，只在 GPU 上训练时使用"
        return Row("显存预算", f"{override / 2**30:.1f} GiB（来自 {GPU_MEMORY_ENV}{where}）", OK)
    if free_gib is None:
        return Row("显存预算", "没有 CUDA：不适用（gpu 配置档按 8 GB 显卡设计，规划峰值不超过 7 GiB）", OK)
    status = OK if free_gib >= 7 else WARN
    return Row("显存预算", f"空闲 {free_gib:.1f} GiB（设置 {GPU_MEMORY_ENV} 可改写）", status,
               "" if status == OK else "gpu 配置档按 7 GiB 规划；放不下时训练会自动切小批次（更慢），或先关掉占用显存的程序")


def check_folder(name, path, missing_status):
    """path：环境变量 name 解析成的绝对路径（未设置为 None）。"""
    if path is None or os.path.isdir(path):
        return Row(name, "未设置" if path is None else str(path), OK)
    return Row(name, f"{path} 不存在", missing_status, f"改成存在的目录，或取消 {name}")


def check_tokenizer(load):
    """load：返回 GPT-2 分词器的函数（shared.tokenizer.get_gpt2_tokenizer）；它的任何异常都变成一行 ✗。"""
    try:
        return Row("GPT-2 分词器", f"可以加载（词表 {load().n_vocab}）", OK)
    except Exception as e:
        return Row("GPT-2 分词器", str(e).splitlines()[0], FAIL,
                   f"设置 {TIKTOKEN_CACHE_ENV}=<tiktoken 缓存目录> 或 {MIRROR_ENV}=<镜像目录>，或联网后重试")


def gather():
    """读取本机的事实，返回所有行。"""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    rows = [check_python(sys.version_info, re.search(r'requires-python\s*=\s*"([^"]+)"', pyproject).group(1))]
    try:
        import torch
    except ImportError:
        return rows + [Row("PyTorch", "没有安装", FAIL, "python -m pip install -r requirements.txt -e .")]
    from .download import mirror_dir
    from .tokenizer import get_gpt2_tokenizer

    cuda, system, device_type = torch.cuda.is_available(), platform.system(), get_device().type
    rows += [Row("PyTorch", torch.__version__, OK),
             check_cuda(cuda, torch.version.cuda, has_driver=shutil.which("nvidia-smi") is not None),
             Row("Apple MPS", "可用" if torch.backends.mps.is_available() else "不可用", OK)]
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        rows.append(check_gpu(p.name, p.total_memory / 2**30, (p.major, p.minor), torch.cuda.get_arch_list()))
    compiler = next((c for c in ("cl", "gcc", "g++", "clang") if shutil.which(c)), None)
    cache = os.environ.get(TIKTOKEN_CACHE_ENV)
    return rows + [
        check_bf16(device_type, cuda and torch.cuda.is_bf16_supported()),
        check_compile(system, device_type, importlib.util.find_spec("triton") is not None, compiler),
        check_disk(shutil.disk_usage(REPO_ROOT).free / 1e9),
        check_profile(os.environ.get(PROFILE_ENV, "")),
        check_gpu_budget(torch.cuda.mem_get_info()[0] / 2**30 if cuda else None),
        check_folder(MIRROR_ENV, mirror_dir(), FAIL),  # 设置了镜像就完全不联网：目录不存在时什么都下载不了
        check_folder(TIKTOKEN_CACHE_ENV, REPO_ROOT / os.path.expanduser(cache) if cache else None, WARN),
        Row(HF_ENDPOINT_ENV, os.environ.get(HF_ENDPOINT_ENV) or "未设置（https://huggingface.co）", OK),
        check_tokenizer(get_gpt2_tokenizer)]


def main():
    sys.stdout.reconfigure(errors="replace")  # Windows 的 GBK 控制台输出重定向到文件时，✓ ⚠ ✗ 不会让程序报错
    rows = gather()
    width = lambda s: sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in s)  # 汉字占两格
    pad = max(width(r.item) for r in rows) + 2
    print("检查项" + " " * (pad - 6) + "状态  结果 / 修复建议")
    for r in rows:
        print(r.item + " " * (pad - width(r.item)) + r.status + "     " + r.result)
        if r.fix:
            print(" " * (pad + 6) + "修复建议：" + r.fix)
    failed = sum(r.status == FAIL for r in rows)
    print(f"\n{failed} 项必须修复（✗）。" if failed else "\n没有必须修复的问题。")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
