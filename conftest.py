"""整个 pytest 会话的配置档：没有设置 LLM_PROFILE 时默认 tiny，所以 README 的测试命令在任何机器上都几分钟跑完，
不会写 cpu 档的检查点，也不会在读者的 GPU 上按 gpu 档训练。nbval 启动的内核继承这个环境变量。"""
import os

# pytest -n 2 同时跑两本笔记本。每个内核的 torch 默认每个核开一个 OpenMP 线程，2 核的机器上两个内核的线程互相等待，
# 小算子多的 tiny 笔记本会慢 20 倍以上（唐诗 SFT/RL 笔记本单独跑约 20 s，并行时超过 12 分钟）。所以每个进程只用一半的核；
# 必须在 import torch 之前设置，nbval 启动的内核继承它。
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))

from shared.runtime import PROFILE_ENV, get_profile  # noqa: E402

PROFILE_WAS_SET = bool(os.environ.get(PROFILE_ENV, "").strip())
if not PROFILE_WAS_SET:
    os.environ[PROFILE_ENV] = "tiny"


def pytest_report_header(config):
    source = f"来自 {PROFILE_ENV}" if PROFILE_WAS_SET else f"{PROFILE_ENV} 未设置，测试默认 tiny"
    return f"profile: {get_profile()}（{source}）"
