"""维护者脚本：按给定配置档从头到尾执行笔记本并原地保存输出，打印每个笔记本的用时。

用法::

    python tests/execute_notebooks.py 03_attention/01_attention.ipynb [更多笔记本…] [--profile cpu]

提交的笔记本输出应来自 ``--profile cpu``（默认）。
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def execute(notebook, profile):
    env = dict(os.environ, LLM_PROFILE=profile)
    env.pop("MPLBACKEND", None)  # 让内核使用 inline 后端，图才会存进笔记本
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
         "--ExecutePreprocessor.timeout=-1", "--ExecutePreprocessor.kernel_name=python3", str(notebook)],
        check=True, env=env,
    )
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--profile", default="cpu", choices=["tiny", "cpu", "gpu"])
    args = parser.parse_args()
    for nb in args.notebooks:
        seconds = execute(nb, args.profile)
        print(f"{nb.as_posix()}\t{args.profile}\t{seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
