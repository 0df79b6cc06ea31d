"""运行环境：仓库位置、环境变量名、配置档 (profile)、设备、随机种子、eval 模式与原子写入。

本模块只在用到时才导入 torch，所以 ``import shared``、``python -m shared.export`` 与下载助手都不需要 PyTorch。

配置档由环境变量 ``LLM_PROFILE`` 决定，每次调用 ``get_profile()`` 时读取并校验：

- ``tiny``：CI 使用，小模型、少步数，每个笔记本在 2 核 CPU 上远小于一分钟；
- ``cpu``：无 GPU 时的默认值，在 2 核笔记本电脑上几分钟内得到有意义的结果；
- ``gpu``：有 CUDA 时的默认值，放大到 GPT-2 124M，使用 bf16、torch.compile 与 fused AdamW。
"""
import contextlib
import os
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# 课程读取的全部环境变量（README 的“配置档”“离线镜像”两节有说明）
PROFILE_ENV = "LLM_PROFILE"
MIRROR_ENV = "LLM_MIRROR"
DOWNLOAD_CACHE_ENV = "LLM_CACHE_DIR"
CHECKPOINT_ENV = "LLM_CHECKPOINT_DIR"
TIKTOKEN_CACHE_ENV = "TIKTOKEN_CACHE_DIR"
ALLOW_DOWNLOAD_ENV = "LLM_ALLOW_DOWNLOAD"  # =1 时才自动下载大文件（如 0.5 GB 的 GPT-2 权重）
HF_ENDPOINT_ENV = "HF_ENDPOINT"  # Hugging Face 的下载地址，例如国内镜像 https://hf-mirror.com
GPU_MEMORY_ENV = "LLM_GPU_MEMORY_GB"  # 训练时按多少 GiB 显存规划（默认：GPU 的空闲显存）

PROFILES = ("tiny", "cpu", "gpu")


def get_profile(profile=None):
    """返回配置档：给出 profile 时校验它，否则读 ``LLM_PROFILE``；都没有时有 CUDA 则为 ``gpu``，否则为 ``cpu``。"""
    value = (profile if profile is not None else os.environ.get(PROFILE_ENV, "")).strip().lower()
    if not value:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    if value not in PROFILES:
        raise ValueError(
            f"未知的配置档 {PROFILE_ENV}={value!r}；可选值为 {', '.join(PROFILES)}。"
            f"例如：export {PROFILE_ENV}=cpu（PowerShell：$env:{PROFILE_ENV}=\"cpu\"）"
        )
    return value


def gpu_memory_override():
    """``LLM_GPU_MEMORY_GB`` 给出的显存预算（字节）；未设置时返回 None，不是正数时报错。"""
    value = os.environ.get(GPU_MEMORY_ENV, "").strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = 0.0
    if not 0 < gib < 1e4:
        raise ValueError(f"{GPU_MEMORY_ENV}={value!r} 不是有效的显存大小；请写以 GiB 为单位的正数，例如 {GPU_MEMORY_ENV}=7.5")
    return int(gib * 2**30)


def download_allowed():
    """读者是否允许自动下载大文件：``LLM_ALLOW_DOWNLOAD`` 为 1 / true / yes 时允许。"""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def get_device(prefer=None):
    """依次选择 cuda、mps、cpu；``prefer`` 可强制指定，例如 ``"cpu"``。"""
    import torch

    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed=123):
    """同时设置 Python、NumPy 与 PyTorch（含所有 GPU）的随机种子。"""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def eval_mode(model):
    """在 with 块里让 model 处于 eval 模式，离开时（包括出错时）恢复原来的 train/eval 模式。"""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def checkpoint_dir():
    """保存检查点的目录：``LLM_CHECKPOINT_DIR``，否则为仓库下被 git 忽略的 ``checkpoints/``。"""
    value = os.environ.get(CHECKPOINT_ENV)
    path = Path(value).expanduser() if value else REPO_ROOT / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path, write):
    """原子地写文件：write(tmp) 写同目录下的临时文件，fsync 落盘后用 os.replace 改名为 path。

    于是 path 要么是旧的完整版本，要么是新的完整版本；write 出错时临时文件被删除、path 不变。返回 Path(path)。
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # 先让内容落盘，再改名：断电后不会出现“名字是新的、内容是空的”
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # 目录项也落盘（Windows 不能打开目录，os.replace 已足够）
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def progress_bar(iterable=None, desc=None, total=None, disable=False, updates=10, **kwargs):
    """tqdm 进度条，整个循环只刷新约 updates 次：存进笔记本的输出不会堆积成百上千个刷新片段。

    iterable 为 None 时是手动的进度条（调用 update(n)，例如下载的字节数）；其余参数原样交给 tqdm。
    maxinterval=inf：否则 tqdm 的监视线程在两次刷新相隔 10 秒以上时会把 miniters 改回 1，之后每一步都刷新。
    """
    from tqdm import tqdm

    total = len(iterable) if total is None and iterable is not None else total
    return tqdm(iterable, desc=desc, total=total, disable=disable, miniters=max(1, total // updates) if total else None,
                mininterval=0.5, maxinterval=float("inf"), **kwargs)


def describe():
    """返回一行说明：配置档、设备与 PyTorch 版本，供笔记本开头打印。"""
    import torch

    return f"配置档 (profile): {get_profile()} | 设备: {get_device()} | PyTorch {torch.__version__}"
