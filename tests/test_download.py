import hashlib
import re
from pathlib import Path

import pytest

from shared import download as dl
from tests.conftest import SHARED_MIRROR

URL = "https://example.org/data/测试%20file.txt"
CONTENT = "第一行\nsecond line\n".encode("utf-8")
SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def mirror(tmp_path, monkeypatch, isolated_cache):
    root = tmp_path / "mirror"
    monkeypatch.setenv("LLM_MIRROR", str(root))
    return root


def put(mirror_root, url, data):
    path = mirror_root / dl.url_to_relpath(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def leftovers(cache):
    """下载失败后缓存里残留的文件（临时文件或半截文件）。"""
    return [p for p in cache.rglob("*") if p.is_file()]


def test_url_to_relpath_decodes_percent_escapes():
    assert dl.url_to_relpath(URL) == Path("example.org/data/测试 file.txt")
    with pytest.raises(ValueError, match="不是 http"):
        dl.url_to_relpath("ftp://example.org/x")
    with pytest.raises(ValueError, match="URL 路径不合法"):
        dl.url_to_relpath("https://example.org/../etc/passwd")


def test_mirror_hit_is_cached_and_verified(mirror, isolated_cache):
    put(mirror, URL, CONTENT)
    path = dl.download(URL, sha256=SHA, size=len(CONTENT))
    assert path.read_bytes() == CONTENT
    assert isolated_cache in path.parents
    # 第二次直接命中缓存：即使镜像里的文件被删除也能返回
    (mirror / dl.url_to_relpath(URL)).unlink()
    assert dl.download(URL, sha256=SHA).read_bytes() == CONTENT


def test_corrupt_file_detected_and_nothing_left_behind(mirror, isolated_cache):
    put(mirror, URL, b"tampered content")
    with pytest.raises(dl.DownloadError, match=r"(?s)未通过校验：sha256 不符.*URL: " + re.escape(URL)):
        dl.download(URL, sha256=SHA)
    assert not (isolated_cache / dl.url_to_relpath(URL)).exists()
    assert leftovers(isolated_cache) == []


def test_truncated_file_detected(mirror, isolated_cache):
    put(mirror, URL, CONTENT[:5])
    with pytest.raises(dl.DownloadError, match="大小不符"):
        dl.download(URL, size=len(CONTENT))
    assert not (isolated_cache / dl.url_to_relpath(URL)).exists()


def test_empty_file_is_an_error(mirror):
    put(mirror, URL, b"")
    with pytest.raises(dl.DownloadError, match="为空"):
        dl.download(URL)


def test_missing_mirror_file_gives_clear_error(mirror):
    with pytest.raises(dl.DownloadError, match=r"(?s)镜像中没有这个文件：LLM_MIRROR 指向的镜像里应有 example\.org/data/测试 file\.txt.*"
                                               + r"URL: " + re.escape(URL)):
        dl.download(URL)


def test_corrupt_cache_is_replaced(mirror, isolated_cache):
    put(mirror, URL, CONTENT)
    cached = isolated_cache / dl.url_to_relpath(URL)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half")
    assert dl.download(URL, sha256=SHA).read_bytes() == CONTENT


def test_interrupted_network_download_leaves_no_partial_file(monkeypatch, isolated_cache):
    monkeypatch.delenv("LLM_MIRROR", raising=False)

    def broken_fetch(url, dest, timeout):
        dest.write_bytes(CONTENT[:3])
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(dl, "_fetch_from_network", broken_fetch)
    with pytest.raises(dl.DownloadError, match=r"(?s)无法下载（connection reset by peer）.*URL: " + URL + ".*LLM_MIRROR"):
        dl.download(URL)
    assert not (isolated_cache / dl.url_to_relpath(URL)).exists()
    assert leftovers(isolated_cache) == []


def test_relative_mirror_resolves_against_repo_root(monkeypatch):
    monkeypatch.setenv("LLM_MIRROR", "../shared/data/mirror")
    assert dl.mirror_dir() == (dl.REPO_ROOT / "../shared/data/mirror").resolve()


@pytest.mark.parametrize("url", sorted(dl.KNOWN_FILES))
def test_known_data_sets_in_shared_mirror_match_checksums(monkeypatch, isolated_cache, url):
    if not SHARED_MIRROR.is_dir():
        pytest.skip("仓库旁没有 ../shared/data/mirror")
    monkeypatch.setenv("LLM_MIRROR", str(SHARED_MIRROR))
    sha, size = dl.KNOWN_FILES[url]
    path = dl.download(url)
    assert path.stat().st_size == size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


HF_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/config.json"


def test_network_url_honours_hf_endpoint_only_for_hugging_face(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dl.network_url(HF_URL) == HF_URL
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    assert dl.network_url(HF_URL) == "https://hf-mirror.com/openai-community/gpt2/resolve/main/config.json"
    assert dl.network_url(URL) == URL  # 其他网站不受影响
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/prefix")
    assert dl.network_url(HF_URL) == "http://127.0.0.1:9/prefix/openai-community/gpt2/resolve/main/config.json"
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.com")
    with pytest.raises(dl.DownloadError, match="HF_ENDPOINT='hf-mirror.com' 不是 http"):
        dl.network_url(HF_URL)


def test_download_through_hf_endpoint_caches_under_the_canonical_path(monkeypatch, isolated_cache):
    import http.server
    import threading

    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(CONTENT)))
            self.end_headers()
            self.wfile.write(CONTENT)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("LLM_MIRROR", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        path = dl.download(HF_URL, sha256=SHA, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert requested == ["/openai-community/gpt2/resolve/main/config.json"]
    assert path == isolated_cache / "huggingface.co/openai-community/gpt2/resolve/main/config.json"
    assert path.read_bytes() == CONTENT
