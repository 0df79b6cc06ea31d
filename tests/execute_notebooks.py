"""维护者脚本：按给定配置档从头到尾执行笔记本并原地保存输出，打印每个笔记本的用时与内核的峰值常驻内存 (peak RSS)。

用法::

    python tests/execute_notebooks.py 03_attention/01_attention.ipynb [更多笔记本…] [--profile cpu] [--output-dir DIR]

提交的笔记本输出应来自 ``--profile cpu``（默认）。``--output-dir`` 把执行后的笔记本写到别处（例如只想量内存时）。
峰值内存取 nbconvert 及其全部子进程（内核）中最大的一个，来自 ``os.wait4``，所以只在 Linux / macOS 上有。
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_bytes(rusage):
    """ru_maxrss 在 Linux 上以 KiB 计，在 macOS 上以字节计。"""
    return rusage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def execute(notebook, profile, output_dir=None):
    """执行一个笔记本，返回 (秒数, 峰值常驻内存字节数或 None)。"""
    env = dict(os.environ, LLM_PROFILE=profile)
    env.pop("MPLBACKEND", None)  # 让内核使用 inline 后端，图才会存进笔记本
    target = ["--inplace"] if output_dir is None else ["--output-dir", str(output_dir)]
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", *target,
           "--ExecutePreprocessor.timeout=-1", "--ExecutePreprocessor.kernel_name=python3", str(notebook)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    if hasattr(os, "wait4"):  # 子进程（含它回收的内核进程）的资源用量
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode, peak = os.waitstatus_to_exitcode(status), peak_rss_bytes(rusage)
    else:
        proc.wait()
        peak = None
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - start, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--profile", default="cpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    for nb in args.notebooks:
        seconds, peak = execute(nb, args.profile, args.output_dir)
        memory = "" if peak is None else f"\tpeak RSS {peak / 2**30:.2f} GiB"
        print(f"{nb.as_posix()}\t{args.profile}\t{seconds:.0f} s{memory}", flush=True)


if __name__ == "__main__":
    main()
