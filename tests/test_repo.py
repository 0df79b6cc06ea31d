"""仓库层面的约定：README 的测试命令就是 CI 跑的命令；笔记本的存档输出干净可信。"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in REPO.glob("[0-9][0-9]_*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)
TEST_COMMAND = "python -m pip install -r requirements.txt -r requirements-test.txt -e . && python -m pytest"


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in readme
    assert ci.rstrip().splitlines()[-1] == TEST_COMMAND
    assert "pip install -q torch==2.13.0" in ci


def test_every_chapter_has_notebooks():
    chapters = ["01_pytorch", "02_data_engineering", "03_attention", "04_gpt_model",
                "05_pretraining", "06_finetuning", "07_lora"]
    present = {p.parent.name for p in NOTEBOOKS}
    assert [c for c in chapters if c not in present] == []


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = code_cells(nb)
    sources = ["".join(c["source"]) for c in cells]
    # 只从标准库、requirements 与 shared 导入：不许改 sys.path，也不许从其他章节目录导入
    for src in sources:
        assert "sys.path" not in src, "笔记本不应修改 sys.path；shared 通过 pip install -e . 导入"
        assert not re.search(r"^\s*(from|import)\s+0\d_", src, re.M)
        assert "previous_chapters" not in src
    # 开头几个代码单元格要打印当前配置档
    assert any("describe()" in s or "PROFILE" in s for s in sources[:3]), "开头要打印配置档"
    outputs = json.dumps([c.get("outputs", []) for c in cells], ensure_ascii=False)
    assert '"output_type": "error"' not in outputs
    assert not re.search(r"(/root/|/work/|/home/\w+/|/tmp/|site-packages)", outputs), "输出里有机器路径"
    assert not re.search(r" at 0x[0-9a-f]{6,}", outputs), "输出里有内存地址"
    counts = [c["execution_count"] for c, s in zip(cells, sources) if s.strip()]
    assert None not in counts and counts == sorted(counts), "单元格应从上到下一次运行"
    if (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5):  # 4.5 起每个单元格都要有 id，否则 nbformat 警告、将来报错
        assert all("id" in c for c in nb["cells"]), "有单元格缺少 id（手工插入单元格时要加上）"


def test_pytest_defaults_to_tiny_and_says_so(tmp_path):
    """不设 LLM_PROFILE 运行 pytest：表头写明 tiny，笔记本的内核也用 tiny（保存的检查点是 tiny 档的词表大小 500）。"""
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_PROFILE", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST")}
    env.update(LLM_CHECKPOINT_DIR=str(tmp_path), CI="true")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-o", "addopts=--nbval-lax",
                           "01_pytorch/01_pytorch_basics.ipynb"], cwd=REPO, env=env, capture_output=True, text=True,
                          encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "profile: tiny（LLM_PROFILE 未设置，测试默认 tiny）" in proc.stdout
    shapes = [tuple(t.shape) for t in load_file(tmp_path / "01_pytorch_sentiment_mlp.safetensors").values()]
    assert any(500 in s for s in shapes) and not any(2000 in s for s in shapes), shapes
