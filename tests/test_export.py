"""shared/ 里的代码必须就是笔记本里 #@save 单元格的代码：一旦两者不同，这里就失败。"""
import json

import pytest

from shared import export


def test_shared_modules_match_notebook_cells():
    problems = export.stale_modules()
    assert problems == [], "运行 `python -m shared.export` 重新导出，或修正笔记本：\n" + "\n".join(problems)


def test_every_save_target_is_a_generated_module():
    for module in export.saved_cells():
        text = (export.SHARED_DIR / f"{module}.py").read_text(encoding="utf-8")
        assert export.GENERATED_MARKER in text, module


def _notebook(path, sources):
    cells = [{"cell_type": "code", "source": s, "metadata": {}, "outputs": [], "execution_count": None}
             for s in sources]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_export_mechanism_on_a_toy_repository(tmp_path):
    _notebook(tmp_path / "02_b" / "01_x.ipynb", ["#@save demo\ndef g():\n    return 2\n"])
    _notebook(tmp_path / "01_a" / "01_x.ipynb", ["#@save demo\ndef f():\n    return 1", "print('not saved')"])
    cells = export.saved_cells(tmp_path)
    assert cells == {"demo": [("01_a/01_x.ipynb", "def f():\n    return 1"), ("02_b/01_x.ipynb", "def g():\n    return 2")]}

    head = '"""演示模块。"""\n\n' + export.GENERATED_MARKER + "\nstale code\n"
    rendered = export.render(head, cells["demo"])
    assert rendered.startswith('"""演示模块。"""\n\n' + export.GENERATED_MARKER)
    assert "stale code" not in rendered
    assert rendered.index("def f()") < rendered.index("def g()")
    namespace = {}
    exec(rendered, namespace)
    assert namespace["f"]() + namespace["g"]() == 3
    # 渲染结果是稳定的：再渲染一次不变
    assert export.render(rendered, cells["demo"]) == rendered


def test_render_requires_marker():
    with pytest.raises(ValueError, match="缺少生成标记行"):
        export.render("no marker here", [])
