import os

import pytest
import tiktoken

from shared import tokenizer as tk
from shared.download import DownloadError
from tests.conftest import SHARED_MIRROR


@pytest.fixture
def fresh_cache():
    tk.get_gpt2_tokenizer.cache_clear()
    yield
    tk.get_gpt2_tokenizer.cache_clear()


def test_relative_tiktoken_cache_resolves_against_repo_root(monkeypatch, fresh_cache):
    """笔记本的工作目录各不相同：相对的 TIKTOKEN_CACHE_DIR 按仓库根目录解析，而不是按当前目录。"""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "some/relative/dir")
    seen = []
    monkeypatch.setattr(tk.tiktoken, "get_encoding", lambda name: seen.append(os.environ["TIKTOKEN_CACHE_DIR"]) or "enc")
    assert tk.get_gpt2_tokenizer() == "enc"
    assert seen == [str(tk.REPO_ROOT / "some" / "relative" / "dir")]


def test_vocab_and_special_token():
    enc = tk.get_gpt2_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [tk.EOT_ID] == [50256]
    assert enc.encode("Hello world") == [15496, 995]


def test_falls_back_to_download_helper(monkeypatch, fresh_cache, isolated_cache):
    """tiktoken 自己取不到文件时，改从镜像读 vocab.bpe / encoder.json，结果必须与 tiktoken 完全一致。"""
    reference = tiktoken.get_encoding("gpt2")
    monkeypatch.setenv("LLM_MIRROR", str(SHARED_MIRROR))

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tk.tiktoken, "get_encoding", offline)
    enc = tk.get_gpt2_tokenizer()
    assert enc is not reference and enc.n_vocab == 50257
    for text in ["Hello 世界 🤖 <|endoftext|> end", "床前明月光，疑是地上霜。", "emoji 🤖🚀 and 中文 mixed", ""]:
        ids = enc.encode(text, allowed_special="all")
        assert ids == reference.encode(text, allowed_special="all")
        assert enc.decode(ids) == text


def test_clear_error_when_everything_fails(monkeypatch, fresh_cache, isolated_cache, tmp_path):
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.setattr(tk.tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(DownloadError, match=r"(?s)无法加载 GPT-2 分词器.*TIKTOKEN_CACHE_DIR=.*LLM_MIRROR=<镜像目录>，其中放有"):
        tk.get_gpt2_tokenizer()
