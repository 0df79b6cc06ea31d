"""shared.poetry：《全唐诗》的读取与清洗、繁简转换、十三辙押韵、格式检查与约束解码（05_pretraining/bonus_tang_poetry_gpt）。"""
import pytest
import torch

from shared import poetry
from shared.download import DownloadError
from shared.generate import generate
from shared.model import GPTModel, model_config
from shared.poetry import (check_poem, clean_poem, even_lines_rhyme, format_constraint, poem_text, rhyme_groups,
                           split_lines, split_poems, strip_notes, to_simplified)
from shared.reviews import CharTokenizer

JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


def test_strip_notes_removes_nested_notes_and_keeps_restored_characters():
    assert strip_notes("[爽]節在重九（一作「初（又作始）」），物華「新」雨餘〖注〗。") == "爽節在重九，物華新雨餘。"
    assert strip_notes("清秋黃葉下{校}，菊散金潭初(見某書)。") == "清秋黃葉下，菊散金潭初。"


@pytest.mark.parametrize("traditional, simplified", [("舉頭望明月，低頭思故鄉。", "举头望明月，低头思故乡。"),
                                                      ("雲", "云"), ("長安", "长安"), ("萬里", "万里"), ("風", "风")])
def test_to_simplified_known_characters(traditional, simplified):
    assert to_simplified(traditional) == simplified


def test_clean_poem_keeps_regular_quatrains_and_regulated_verse_only():
    entry = {"title": "靜夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜（一作「霜」）。", "舉頭望明月，低頭思故鄉？"]}
    poem = clean_poem(entry)
    assert poem == {"title": "静夜思", "author": "李白", "form": "五言绝句",
                    "lines": ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]}
    assert poem_text(poem["lines"]) == JINGYESI  # 问号统一成偶数句后的句号
    seven = {"title": "t", "author": "a", "paragraphs": ["一二三四五六七，一二三四五六七。"] * 4}
    assert clean_poem(seven)["form"] == "七言律诗"
    bad = [["床前明月光，疑是地上霜。"],                                   # 只有 2 句
           ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "一二三四五，一二三四五。"],  # 6 句
           ["床前明月光，疑是地上霜。", "举头望明，低头思故乡。"],            # 字数不齐
           ["床前明月□，疑是地上霜。", "举头望明月，低头思故乡。"],           # 缺字
           ["床前明月光，疑是地上霜", "举头望明月，低头思故乡。"],             # 中间少了句号
           ["床前明月光床，疑是地上霜疑。", "举头望明月举，低头思故乡低。"],  # 六言
           [], ["  "]]
    for paragraphs in bad:
        assert clean_poem({"title": "t", "author": "a", "paragraphs": paragraphs}) is None, paragraphs
    assert clean_poem({"title": "t", "author": "a"}) is None  # 没有 paragraphs 的条目


def test_split_lines_rejects_trailing_text_and_non_han():
    assert split_lines("床前明月光，疑是地上霜。") == ["床前明月光", "疑是地上霜"]
    assert split_lines("床前明月光，疑是地上霜") is None
    assert split_lines("床前明月光，疑是地上3。") is None


def test_split_poems_is_a_deterministic_partition():
    poems = [{"lines": [str(i)]} for i in range(200)]
    parts = split_poems(poems, seed=1)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [180, 10, 10]
    ids = [p["lines"][0] for part in parts.values() for p in part]
    assert sorted(ids, key=int) == [str(i) for i in range(200)]  # 不重不漏
    assert split_poems(poems, seed=1) == parts and split_poems(poems, seed=2) != parts
    with pytest.raises(ValueError, match="fractions 应为三个正数且和为 1"):
        split_poems(poems, fractions=(0.9, 0.2, -0.1))


def test_rhyme_groups_use_all_readings():
    assert {c: rhyme_groups(c) for c in "霜乡光"} == {c: frozenset({"江阳"}) for c in "霜乡光"}
    assert rhyme_groups("行") >= {"中东", "江阳"}  # 多音字：xíng / háng
    assert rhyme_groups("人") == {"人辰"} and rhyme_groups("，") == frozenset()
    assert even_lines_rhyme(["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"])
    assert not even_lines_rhyme(["床前明月光", "疑是地上霜", "举头望明月", "低头思故人"])
    assert not even_lines_rhyme(["床前明月光", "疑是地上霜"])  # 只有一个偶数句，谈不上押韵


@pytest.mark.parametrize("text, failed", [
    (JINGYESI, set()),
    ("床前明月光，疑是地上霜。举头望明月，低头思故人。", {"rhyme"}),
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡", {"punctuation"}),                   # 没写完
    ("床前明月光，疑是地上霜。举头望明，低头思故乡。", {"line length"}),
    ("床前明月光，疑是地上霜。", {"line count", "rhyme"}),
    ("床前明月光，疑是地上霜。举头望明月。低头思故乡，", {"punctuation"}),                 # 标点位置错
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡。举头望明月，低头思故乡。", {"line count"}),  # 6 句
    ("床前明月a，疑是地上霜。举头望明月，低头思故乡。", {"punctuation"}),                   # 非汉字
    ("", {"line length", "line count", "punctuation", "rhyme"}),
])
def test_check_poem_on_hand_written_poems(text, failed):
    result = check_poem(text)
    assert {k for k, ok in result.items() if not ok} - {"all"} == failed
    assert result["all"] == (not failed)


def test_format_constraint_makes_every_sample_well_formed():
    """随机初始化的小模型 + 格式约束（可选押韵约束）：每一首都通过格式检查，押韵约束下也都押韵。"""
    text = "".join(poem_text(["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]) + "\n" for _ in range(3)) + "春风人行云山水"
    tok = CharTokenizer([text], min_count=1)
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), vocab_size=len(tok), context_length=80)).eval()
    newline = tok.ids["\n"]
    shapes = [(5, 4), (7, 4), (5, 8), (7, 8)] * 3
    lengths, counts = zip(*shapes)
    for rhyme in (False, True):
        allowed = format_constraint(tok, 1, lengths, counts, rhyme=rhyme)
        out = generate(model, torch.full((len(shapes), 1), newline), 66, temperature=1.0, eos_id=newline, allowed=allowed,
                       generator=torch.Generator().manual_seed(0))
        for row, (n, m) in zip(out.tolist(), shapes):
            poem = tok.decode(row[1:row.index(newline, 1)])
            result = check_poem(poem)
            assert len(poem) == m * (n + 1) and result["line length"] and result["line count"] and result["punctuation"]
            assert result["rhyme"] or not rhyme, poem


def test_load_tang_poems_checks_the_digest(monkeypatch):
    entries = poetry.load_tang_poems()
    assert len(entries) == 57_607 and {"title", "paragraphs"} <= set(entries[0])
    monkeypatch.setattr(poetry, "TANG_DIGEST", "0" * 64)
    with pytest.raises(DownloadError, match="《全唐诗》文件与课程核对过的版本不同"):
        poetry.load_tang_poems()
