"""运行配置：配置档 (profile) 开关、设备选择与随机种子。

配置档由环境变量 ``LLM_PROFILE`` 决定：

- ``tiny``：CI 使用，小模型、少步数，每个笔记本在 2 核 CPU 上远小于一分钟；
- ``cpu``：无 GPU 时的默认值，在 2 核笔记本电脑上几分钟内得到有意义的结果；
- ``gpu``：有 CUDA 时的默认值，放大到 GPT-2 124M，使用 bf16、torch.compile 与 fused AdamW。
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_ENV = "LLM_PROFILE"
CHECKPOINT_ENV = "LLM_CHECKPOINT_DIR"
PROFILES = ("tiny", "cpu", "gpu")


def get_profile():
    """读取 ``LLM_PROFILE``；未设置时有 CUDA 则为 ``gpu``，否则为 ``cpu``。未知取值直接报错。"""
    value = os.environ.get(PROFILE_ENV, "").strip().lower()
    if not value:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if value not in PROFILES:
        raise ValueError(
            f"未知的配置档 {PROFILE_ENV}={value!r}；可选值为 {', '.join(PROFILES)}。"
            f"例如：export {PROFILE_ENV}=cpu（PowerShell：$env:{PROFILE_ENV}=\"cpu\"）"
        )
    return value


PROFILE = get_profile()


def get_device(prefer=None):
    """依次选择 cuda、mps、cpu；``prefer`` 可强制指定，例如 ``"cpu"``。"""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed=123):
    """同时设置 Python、NumPy 与 PyTorch（含所有 GPU）的随机种子。"""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def checkpoint_dir():
    """保存检查点的目录：``LLM_CHECKPOINT_DIR``，否则为仓库下被 git 忽略的 ``checkpoints/``。"""
    path = Path(os.environ[CHECKPOINT_ENV]).expanduser() if os.environ.get(CHECKPOINT_ENV) else REPO_ROOT / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def describe():
    """返回一行说明：配置档、设备与 PyTorch 版本，供笔记本开头打印。"""
    return f"配置档 (profile): {PROFILE} | 设备: {get_device()} | PyTorch {torch.__version__}"
