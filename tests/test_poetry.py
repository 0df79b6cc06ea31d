"""shared.poetry：《全唐诗》的读取与清洗、繁简转换、十三辙押韵、格式检查与约束解码（05_pretraining/bonus_tang_poetry_gpt）；
指令数据、词表扩充与藏头绝句的奖励（06_finetuning/bonus_tang_poetry_sft_rl）。"""
import pytest
import torch

from shared import poetry
from shared.download import DownloadError
from shared.generate import generate
from shared.model import GPTModel, model_config
from shared.poetry import (acrostic_reward, check_poem, clean_poem, distinct_n, even_lines_rhyme, extend_vocab,
                           follows_instruction, format_constraint, poem_instruction, poem_prompt, poem_text, rhyme_groups,
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


def test_load_tang_splits_reproduces_the_pretraining_split():
    splits = poetry.load_tang_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 33_135, "val": 1_840, "test": 1_842}  # 上一本打印的数字
    keys = {name: {"".join(p["lines"]) for p in part} for name, part in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


CHUNXIAO = {"title": "春晓", "form": "五言绝句", "lines": ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少"]}
LIANGZHOUCI = {"title": "凉州词", "form": "七言绝句",
               "lines": ["黄河远上白云间", "一片孤城万仞山", "羌笛何须怨杨柳", "春风不度玉门关"]}
JINGYESI_LINES = ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]


@pytest.mark.parametrize("poem", [CHUNXIAO, LIANGZHOUCI])
@pytest.mark.parametrize("kind", ["acrostic", "title", "continue"])
def test_every_sft_target_satisfies_its_instruction(poem, kind):
    example = poem_instruction(poem, kind)
    assert follows_instruction(example, example["output"])
    prompt = poem_prompt(example["instruction"])
    assert prompt.startswith("### Instruction:\n") and prompt.endswith("\n\n### Response:\n")
    other = poem_text(JINGYESI_LINES if poem is not CHUNXIAO else ["一二三四五六七"] * 4)
    assert not follows_instruction(example, other[len(poem["lines"][0]) + 1:] if kind == "continue" else other)


def test_poem_instruction_contents_and_bad_kind():
    assert poem_instruction(CHUNXIAO, "acrostic")["instruction"] == "写一首五言绝句，藏头：春处夜花"
    assert poem_instruction(LIANGZHOUCI, "title")["instruction"] == "以《凉州词》为题写一首七言绝句"
    cont = poem_instruction(CHUNXIAO, "continue")
    assert cont["instruction"] == "续写：春眠不觉晓，" and cont["output"] == "处处闻啼鸟。夜来风雨声，花落知多少。"
    assert not follows_instruction(poem_instruction(CHUNXIAO, "acrostic"), poem_text(JINGYESI_LINES))  # 字数对、藏头不对
    with pytest.raises(ValueError, match="未知的指令类型"):
        poem_instruction(CHUNXIAO, "haiku")


HEADS = "春夏秋冬"


@pytest.mark.parametrize("text, expected", [
    ("春风吹柳绿，夏雨打荷香。秋月照山冷，冬雪满城霜。", dict(acrostic=1, format=True, rhyme=True, success=True, reward=1)),
    ("东风吹柳绿，夏雨打荷香。秋月照山冷，冬雪满城霜。", dict(acrostic=0.75, format=True, rhyme=True, success=False)),
    # 藏头全对但字数不对：格式不过
    ("春风吹柳绿如烟，夏雨打荷香。秋月照山冷，冬雪满城霜。", dict(acrostic=1, format=False, success=False)),
    ("春风吹柳绿如烟，夏雨打荷香满塘。秋月照山冷清清，冬雪满城霜满城。", dict(acrostic=1, format=False, success=False)),
    ("春风吹柳绿，夏雨打荷花。秋月照山冷，冬雪满城霜。", dict(rhyme=False, success=False)),
    # 同一个字结尾（重韵）不算押韵
    ("春风吹柳绿，夏雨打荷霜。秋月照山冷，冬雪满城霜。", dict(rhyme=False, success=False)),
    # 重复的句子：奖励为 0
    ("春风吹柳绿，春风吹柳绿。春风吹柳绿，春风吹柳绿。", dict(repeated=True, reward=0, success=False)),
    ("春风吹柳绿，夏雨打荷香。春风吹柳绿，冬雪满城霜。", dict(repeated=True, reward=0, success=False)),
    ("春风吹柳绿，夏雨打荷香。秋月照山冷，冬雪满城霜。春", dict(format=False, success=False)),
    ("春风吹柳绿，夏雨打荷香。秋月照山冷，冬雪满城霜。春风吹柳绿，夏雨打荷香。秋月照山冷，冬雪满城霜。",
     dict(format=False, repeated=True, reward=0)),
    ("春风吹柳绿，夏雨打荷香", dict(format=False, rhyme=False, success=False, acrostic=0.5)),
    ("", dict(acrostic=0, format=False, rhyme=False, success=False, reward=0)),
])
def test_acrostic_reward_on_hand_written_and_adversarial_poems(text, expected):
    result = acrostic_reward(text, HEADS, 5)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), (key, result)
    assert 0 <= result["reward"] <= 1


def test_acrostic_reward_wants_the_requested_line_length():
    good5 = "春风吹柳绿，夏雨打荷香。秋月照山冷，冬雪满城霜。"
    assert acrostic_reward(good5, HEADS, 5)["success"] and not acrostic_reward(good5, HEADS, 7)["format"]


def test_distinct_n():
    assert distinct_n(["一二三四五，六七八九十。"] * 4, 2) == pytest.approx(8 / 32)
    assert distinct_n(["一二三四五，六七八九十。", "甲乙丙丁戊，己庚辛壬癸。"], 2) == 1.0
    assert distinct_n([], 2) == 0.0


def test_extend_vocab_keeps_old_ids_and_outputs():
    tok = CharTokenizer(["春风吹柳绿\n"], min_count=1)
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), vocab_size=len(tok), context_length=16))
    idx = torch.tensor([tok.encode("春风吹")])
    before = model(idx).detach()
    old_ids = dict(tok.ids)
    new = extend_vocab(tok, model, "### 春风：")
    assert new == [" ", "#", "："] and all(tok.ids[c] == i for c, i in old_ids.items())
    after = model(idx).detach()
    assert after.shape[-1] == len(tok) == model.cfg["vocab_size"]
    torch.testing.assert_close(after[..., :len(old_ids)], before, rtol=0, atol=1e-6)  # 旧 token 的 logits 不变（1e-6）
    torch.testing.assert_close(model.tok_emb.weight[-1], model.tok_emb.weight[:-3].mean(0))
    assert model.out_head.weight is model.tok_emb.weight
    assert extend_vocab(tok, model, "春风") == []
    with pytest.raises(ValueError, match="词表行数与 tokenizer 不一致"):
        extend_vocab(CharTokenizer(["春"], min_count=1), model, "#")
