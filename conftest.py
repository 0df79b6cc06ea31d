"""整个 pytest 会话的配置档：没有设置 LLM_PROFILE 时默认 tiny，所以 README 的测试命令在任何机器上都几分钟跑完，
不会写 cpu 档的检查点，也不会在读者的 GPU 上按 gpu 档训练。nbval 启动的内核继承这个环境变量。"""
import os

from shared.runtime import PROFILE_ENV, get_profile

PROFILE_WAS_SET = bool(os.environ.get(PROFILE_ENV, "").strip())
if not PROFILE_WAS_SET:
    os.environ[PROFILE_ENV] = "tiny"


def pytest_report_header(config):
    source = f"来自 {PROFILE_ENV}" if PROFILE_WAS_SET else f"{PROFILE_ENV} 未设置，测试默认 tiny"
    return f"profile: {get_profile()}（{source}）"
