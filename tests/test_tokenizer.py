import pytest
import tiktoken

from shared import tokenizer as tk
from tests.conftest import SHARED_MIRROR


@pytest.fixture
def fresh_cache():
    tk.get_gpt2_tokenizer.cache_clear()
    yield
    tk.get_gpt2_tokenizer.cache_clear()


@pytest.mark.parametrize("text", [
    "Hello, world! It's a test.",
    "床前明月光，疑是地上霜。",
    "emoji 🤖🚀 and 中文 mixed",
    "",
])
def test_round_trip(text):
    enc = tk.get_gpt2_tokenizer()
    assert enc.decode(enc.encode(text)) == text


def test_vocab_and_special_token():
    enc = tk.get_gpt2_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.encode("Hello world") == [15496, 995]


def test_falls_back_to_download_helper(monkeypatch, fresh_cache, isolated_cache):
    """tiktoken 自己取不到文件时，改从镜像读 vocab.bpe / encoder.json，结果必须与 tiktoken 完全一致。"""
    reference = tiktoken.get_encoding("gpt2")
    monkeypatch.setenv("LLM_MIRROR", str(SHARED_MIRROR))

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tk.tiktoken, "get_encoding", offline)
    enc = tk.get_gpt2_tokenizer()
    text = "Hello 世界 🤖 <|endoftext|> end"
    assert enc.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


def test_clear_error_when_everything_fails(monkeypatch, fresh_cache, isolated_cache, tmp_path):
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.setattr(tk.tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(RuntimeError) as err:
        tk.get_gpt2_tokenizer()
    assert "TIKTOKEN_CACHE_DIR" in str(err.value) and "LLM_MIRROR" in str(err.value)
