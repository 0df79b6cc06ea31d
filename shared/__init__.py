"""Notes-For-LLM 的共享代码包。

每个模块对应一个主题；凡是在某个笔记本里讲过的代码，都由
``python -m shared.export`` 从该笔记本标记为 ``#@save`` 的单元格原样导出，
测试 ``tests/test_export.py`` 保证两者一致。``import shared`` 本身不导入 torch，
也不读取配置档：用到哪个模块，才导入哪个模块。
"""
