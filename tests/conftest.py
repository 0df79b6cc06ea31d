"""测试共用的夹具 (fixtures)。"""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI 与开发机上，数据镜像都在仓库旁边的 ../shared/data/mirror
SHARED_MIRROR = REPO_ROOT.parent / "shared" / "data" / "mirror"


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """让下载缓存落在临时目录，测试互不干扰。"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_CACHE_DIR", str(cache))
    return cache
