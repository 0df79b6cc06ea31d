"""shared.bpe：从零实现的字节级 BPE。

核心断言：读入 GPT-2 官方 vocab.bpe / encoder.json 后，我们的 id 与 tiktoken 的 GPT-2 **完全相同**
（逐 id 精确相等，没有容差），解码无损；两个训练器学到的合并逐个相同。
"""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import bpe
from shared.download import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, TANG_POEMS, THE_VERDICT, TINY_SHAKESPEARE, download, read_text
from shared.tokenizer import get_gpt2_tokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def ours():
    return bpe.load_gpt2_bpe()


@pytest.fixture(scope="module")
def reference():
    return get_gpt2_tokenizer()


def assert_same(ours, reference, text, **kwargs):
    ids = ours.encode(text, **kwargs)
    assert ids == reference.encode(text, **kwargs)  # 逐 id 精确相等
    assert ours.decode(ids) == text


def test_gpt2_files_load_completely(ours, reference):
    assert ours.n_vocab == reference.n_vocab == 50257
    assert len(ours.merges) == 50000
    assert ours.special_tokens == {EOT: 50256}
    for i in [0, 1, 255, 256, 1000, 50255]:
        assert ours.decode_bytes([i]) == reference.decode_single_token_bytes(i)


@pytest.mark.parametrize("url", [THE_VERDICT, TINY_SHAKESPEARE])
def test_english_corpora_match_tiktoken(ours, reference, url):
    assert_same(ours, reference, read_text(url))


def test_tang_poems_match_tiktoken(ours, reference):
    poems = json.loads(read_text(TANG_POEMS.format(start=0)))
    text = "\n\n".join(p["title"] + "\n" + "\n".join(p.get("paragraphs", [])) for p in poems[:400])
    assert len(text) > 20_000
    assert_same(ours, reference, text)


@pytest.mark.parametrize("text", [
    "emoji 🤖🚀 👩‍👩‍👧‍👦 🇨🇳 flags, ZWJ and skin tones 👍🏽",
    "Mixed: Привет мир, こんにちは世界, 안녕하세요, مرحبا بالعالم, שלום, नमस्ते, ελληνικά, ½ ² Ⅻ ①",
    "def f(x):\n\tif x >= 10:\r\n        return {'a': [1, 2]}  # comment\n\n\nclass A: pass\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\r\n",
    "It's, I'm, you're, they've, we'll, he'd, IT'S, don't — ’s curly apostrophe",
    "numbers 1234567890 3.14159 1e-9 0x7F 1,000,000",
])
def test_mixed_text_matches_tiktoken(ours, reference, text):
    assert_same(ours, reference, text)


@pytest.mark.parametrize("text", [
    "", " ", "  ", "     ", "a", "Hello,", "Hello, world", "Hello,  world", "Hello,   world",
    " leading", "   leading", "trailing ", "trailing   ", "  both  ", "a  b   c    d",
    "\n", "\n\n", "\r\n", "line1\r\nline2\r\n", "\t", "\t\tindented", "a\tb\t\tc", " \t \n \r\n ",
    "end with newline\n", "   \n   x", "\x1c\x1d\x1e\x1f", "\u3000全角空格\u3000", "\xa0nbsp\xa0 \xa0",
    "\x85next line\u2028line sep\u2029para sep",
])
def test_whitespace_edge_cases_match_tiktoken(ours, reference, text):
    assert_same(ours, reference, text)


def test_endoftext_handling_matches_tiktoken(ours, reference):
    text = f"first document{EOT}second {EOT} third{EOT}"
    for kwargs in [dict(allowed_special={EOT}), dict(allowed_special="all"), dict(disallowed_special=())]:
        assert_same(ours, reference, text, **kwargs)
    assert ours.encode(EOT, allowed_special={EOT}) == [50256]
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
    with pytest.raises(ValueError, match="disallowed special token"):
        reference.encode(text)
    with pytest.raises(ValueError, match="allowed_special"):
        ours.encode(text)
    with pytest.raises(ValueError, match="没有的特殊 token"):
        ours.encode("x", allowed_special={"<|unknown|>"})


# 随机 Unicode（不含代理码位 surrogates），再混入空白、缩写、数字等 GPT-2 正则的敏感字符
SENSITIVE = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000'sdmtlvreSD0123456789aZ,.!?-_()中文😀\u0301")
unicode_text = st.text(alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(SENSITIVE)),
                       max_size=60)


@settings(max_examples=1000, deadline=None)
@given(unicode_text)
def test_random_unicode_round_trip_and_matches_tiktoken(ours, reference, text):
    ids = ours.encode_ordinary(text)
    assert ours.decode(ids) == text
    assert ids == reference.encode_ordinary(text)  # 逐 id 精确相等


def test_training_classic_example():
    expected = [(97, 97), (97, 98), (256, 257)]  # aa, ab, aaab（维基百科的 Z、Y、X）
    assert bpe.train_simple("aaabdaaabac", 259) == expected
    assert bpe.train_fast("aaabdaaabac", 259) == expected
    tok = bpe.BPETokenizer(expected)
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode(tok.encode("aaabdaaabac")) == "aaabdaaabac"


def test_tie_break_is_lexicographic_on_bytes():
    # 预分词成 "ab" "\n" "ba"：(a, b) 与 (b, a) 各出现 1 次（并列），按字节串取小，(a, b) 先合并
    assert bpe.train_fast("ab\nba", 257) == bpe.train_simple("ab\nba", 257) == [(97, 98)]
    assert bpe.train_fast("ba\nab", 257) == [(97, 98)]  # 与出现顺序无关


def test_fast_and_simple_trainers_agree_on_real_text():
    text = read_text(THE_VERDICT)[:6000]
    assert bpe.train_fast(text, 400) == bpe.train_simple(text, 400)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="aab b\n.é", max_size=50), st.integers(0, 10))
def test_fast_and_simple_trainers_agree_on_random_text(text, n_merges):
    try:
        simple = bpe.train_simple(text, 256 + n_merges)
    except ValueError:
        with pytest.raises(ValueError, match="语料太小"):
            bpe.train_fast(text, 256 + n_merges)
        return
    assert bpe.train_fast(text, 256 + n_merges) == simple


def test_save_load_round_trip(tmp_path):
    text = read_text(THE_VERDICT)
    tok = bpe.BPETokenizer(bpe.train_fast(text, 500), special_tokens={EOT: 500})
    loaded = bpe.BPETokenizer.load(*tok.save(tmp_path))
    assert loaded.merges == tok.merges
    assert loaded.vocab == tok.vocab
    assert loaded.special_tokens == {EOT: 500}
    sample = text[:3000] + EOT + "中文与 emoji 🤖"
    assert loaded.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
    assert loaded.decode(loaded.encode(sample, allowed_special="all")) == sample
    assert not list(tmp_path.glob("*.tmp"))  # 原子写入不留临时文件


def test_saving_gpt2_reproduces_official_files(ours, tmp_path):
    vocab_bpe, encoder_json = ours.save(tmp_path)
    assert vocab_bpe.read_bytes() == download(GPT2_VOCAB_BPE).read_bytes()
    official = json.loads(download(GPT2_ENCODER_JSON).read_text(encoding="utf-8"))
    assert json.loads(encoder_json.read_text(encoding="utf-8")) == official


@pytest.mark.parametrize("vocab_size", [255, 0, -1, 300.0, "300"])
def test_bad_vocab_size(vocab_size):
    for train in (bpe.train_simple, bpe.train_fast):
        with pytest.raises(ValueError, match="vocab_size"):
            train("some text", vocab_size)


def test_corpus_too_small_for_vocab():
    with pytest.raises(ValueError, match="语料太小"):
        bpe.train_fast("ab", 300)


@pytest.fixture
def toy_files(tmp_path):
    tok = bpe.BPETokenizer(bpe.train_fast("hello hello world", 262), special_tokens={EOT: 262})
    return tok.save(tmp_path)


@pytest.mark.parametrize("corrupt, message", [
    (lambda lines: lines + ["Ġhello"], "两个 token"),                 # 只有一个 token
    (lambda lines: lines + ["h  e"], "两个 token"),                   # 两个空格
    (lambda lines: lines + ["zzz q"], "没有定义"),                   # 引用不存在的 token
    (lambda lines: lines + ["h\u4e00 e"], "字节表"),                 # 表外字符
    (lambda lines: lines[:5] + [lines[6], lines[5]], "不一致"),      # 两行对调：与 encoder.json 对不上
    (lambda lines: lines + [lines[1]], "重复"),                      # 重复的合并
])
def test_corrupt_merges_file_raises(toy_files, corrupt, message):
    vocab_bpe, encoder_json = toy_files
    lines = vocab_bpe.read_text(encoding="utf-8").rstrip("\n").split("\n")
    vocab_bpe.write_text("\n".join(corrupt(lines)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        bpe.BPETokenizer.load(vocab_bpe, encoder_json)


def test_corrupt_encoder_json_raises(toy_files):
    vocab_bpe, encoder_json = toy_files
    encoder_json.write_text('{"a": 1', encoding="utf-8")
    with pytest.raises(ValueError, match="JSON"):
        bpe.BPETokenizer.load(vocab_bpe, encoder_json)
    encoder_json.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="单字节 token"):
        bpe.BPETokenizer.load(vocab_bpe, encoder_json)


def test_bad_ids_and_special_tokens():
    tok = bpe.BPETokenizer([(97, 98)], special_tokens={EOT: 257})
    with pytest.raises(ValueError, match="未知的 token id"):
        tok.decode([258])
    with pytest.raises(ValueError, match="冲突"):
        bpe.BPETokenizer([(97, 98)], special_tokens={EOT: 256})
    with pytest.raises(ValueError, match="尚不存在"):
        bpe.BPETokenizer([(97, 300)])
    with pytest.raises(ValueError, match="排列"):
        bpe.BPETokenizer([], byte_order=[0] * 256)


def test_readable_pieces_regroup_split_characters(ours):
    ids = ours.encode("月光🤖")
    pieces = bpe.readable_pieces(ours, ids)
    assert "".join(s for s, _ in pieces) == "月光🤖"
    assert sum(n for _, n in pieces) == len(ids)
    assert "\ufffd" not in "".join(s for s, _ in pieces)
