"""把笔记本里标记为 ``#@save <模块名>`` 的单元格原样导出到 ``shared/<模块名>.py``。
每个 shared 模块由两部分组成：手写的头部（模块说明与 import），以及 ``GENERATED_MARKER``
之后由本脚本生成的部分。生成部分按笔记本路径顺序拼接各单元格的源码（去掉标记行）。
只用标准库，没有安装 PyTorch 也能运行：``python -m shared.export`` 重新生成，
``python -m shared.export --check`` 只检查，不一致时以非零状态退出（测试也这样做）。"""
import argparse
import json
import re
import sys
from pathlib import Path

from .runtime import REPO_ROOT

SHARED_DIR = Path(__file__).resolve().parent
SAVE_RE = re.compile(r"^#@save\s+([a-z_][a-z0-9_]*)\s*$")
GENERATED_MARKER = "# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ===="


def notebooks(root=REPO_ROOT):
    """所有章节笔记本，按路径排序（也就是课程顺序）。"""
    return sorted(p for p in root.glob("[0-9][0-9]_*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def saved_cells(root=REPO_ROOT):
    """返回 {模块名: [(笔记本相对路径, 单元格源码), ...]}。"""
    cells = {}
    for path in notebooks(root):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            first, _, body = "".join(cell["source"]).partition("\n")
            m = SAVE_RE.match(first.strip())
            if m and cell["cell_type"] == "code":
                cells.setdefault(m.group(1), []).append((path.relative_to(root).as_posix(), body.strip("\n")))
    return cells


def render(module_text, blocks):
    """保留模块头部，用 ``blocks`` 重写标记之后的部分。"""
    head, found, _ = module_text.partition(GENERATED_MARKER)
    if not found:
        raise ValueError("模块缺少生成标记行")
    parts = [head.rstrip("\n") + "\n\n" + GENERATED_MARKER + "\n"]
    previous = None
    for rel, body in blocks:
        source = f"# ---- {rel} ----\n" if rel != previous else ""  # 同一笔记本的连续单元格只标一次来源
        parts.append(f"\n{source}{body}\n")
        previous = rel
    return "\n".join(parts)


def stale_modules(root=REPO_ROOT, write=False, only=None):
    """返回与笔记本不一致的模块列表；``write=True`` 时顺便改写它们（``only`` 可限定模块名）。
    一个模块若找不到任何 #@save 单元格，只报告、不改写，以免误删尚未写好的笔记本对应的代码。"""
    problems = []
    cells = saved_cells(root)
    generated = {p.stem for p in SHARED_DIR.glob("*.py") if GENERATED_MARKER in p.read_text(encoding="utf-8")}
    for module in sorted(set(cells) | generated - {"export"}):
        if only and module not in only:
            continue
        target = SHARED_DIR / f"{module}.py"
        old = target.read_text(encoding="utf-8") if target.exists() else ""
        if GENERATED_MARKER not in old:
            problems.append(f"{module}: shared/{module}.py 不存在或缺少生成标记行（先手写模块头部）")
            continue
        new = render(old, cells.get(module, []))
        if new != old:
            problems.append(f"{module}: shared/{module}.py 与笔记本的 #@save 单元格不一致")
            if write and module in cells:
                target.write_text(new, encoding="utf-8")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="只检查，不写文件")
    parser.add_argument("--module", action="append", help="只处理这个模块（可重复）")
    args = parser.parse_args(argv)
    problems = stale_modules(write=not args.check, only=args.module)
    for p in problems:
        print(("不一致：" if args.check else "已更新：") + p)
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
