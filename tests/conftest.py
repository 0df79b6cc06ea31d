"""测试共用的夹具 (fixtures)，以及 slow 标记：在 CI（环境变量 CI=true）里跳过，本地照常运行。"""
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from shared.download import DownloadError

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI 与开发机上，数据镜像都在仓库旁边的 ../shared/data/mirror
SHARED_MIRROR = REPO_ROOT.parent / "shared" / "data" / "mirror"


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """让下载缓存落在临时目录，测试互不干扰。"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def edited_checkpoint(tmp_path):
    """返回 edit(src, change)：把单文件 HF 检查点 src 复制到新目录，张量字典先经 change(state) 修改；返回新目录。"""
    def edit(src, change):
        dst = tmp_path / "edited_checkpoint"
        dst.mkdir()
        state = load_file(src / "model.safetensors")
        change(state)
        save_file(state, dst / "model.safetensors")
        (dst / "config.json").write_text((src / "config.json").read_text())
        return dst
    return edit


def available(load):
    """返回 load() 的结果；数据拿不到（没有网络、也没有镜像或缓存）时跳过测试，并写明原因。"""
    try:
        return load()
    except DownloadError as e:
        pytest.skip(f"数据不可用：{str(e).splitlines()[0]}")


def pytest_collection_modifyitems(config, items):
    """标记为 slow 的测试（例如 CPU 上的 torch.compile，要编译一两分钟）在 CI 里跳过。"""
    if os.environ.get("CI") != "true":
        return
    skip = pytest.mark.skip(reason="slow：CI 中跳过（本地运行 python -m pytest -m slow）")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
