"""Notes-For-LLM 的共享代码包。

每个模块对应一个主题；凡是在某个笔记本里讲过的代码，都由
``python -m shared.export`` 从该笔记本标记为 ``#@save`` 的单元格原样导出，
测试 ``tests/test_export.py`` 保证两者一致。
"""
from .runtime import PROFILE, get_device, get_profile, set_seed

__all__ = ["PROFILE", "get_profile", "get_device", "set_seed"]
