"""唐诗：读取《全唐诗》、转简体、清洗成规整的五言/七言绝句与律诗、按十三辙判断押韵、程序化的格式检查与约束解码，
在 05_pretraining/bonus_tang_poetry_gpt 中讲解；
指令数据（藏头、命题、续写）、扩充字符词表与藏头绝句的可验证奖励在 06_finetuning/bonus_tang_poetry_sft_rl 中讲解。"""
import functools
import hashlib
import json
import math
import re

import numpy as np
import opencc
import torch
from pypinyin import Style, pinyin

from .download import TANG_POEMS, DownloadError, download
from .instruct import RESPONSE_HEADER
from .runtime import MIRROR_ENV, checkpoint_dir, get_profile

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_tang_poetry_gpt.ipynb ----
TANG_URLS = tuple(TANG_POEMS.format(start=start) for start in range(0, 58_000, 1000))  # 58 个文件，每个约 1000 首
TANG_DIGEST = "8fe9b26648ba959bbebc2f9fe9144185320f809a907a53d65dd0db80e496b417"  # 58 个文件各自 sha256 连起来的 sha256


def load_tang_poems():
    """下载（或从镜像、缓存读取）《全唐诗》的 58 个 JSON 文件，核对整体摘要，返回原始条目的列表（author、title、paragraphs）。"""
    paths = [download(url) for url in TANG_URLS]
    digest = hashlib.sha256("".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths).encode()).hexdigest()
    if digest != TANG_DIGEST:
        raise DownloadError(f"《全唐诗》文件与课程核对过的版本不同（摘要 {digest[:12]}…）。删除 {paths[0].parent} "
                            f"后重新运行即可重新下载；用镜像 {MIRROR_ENV} 时请检查镜像里的文件")
    return [entry for p in paths for entry in json.loads(p.read_text(encoding="utf-8"))]


NOTE_RE = re.compile(r"（[^（）]*）|\([^()]*\)|〖[^〖〗]*〗|\{[^{}]*\}|〈[^〈〉]*〉")  # 出处、校勘、异文等编者注
RESTORED_RE = re.compile(r"\[([^\[\]]*)\]")  # [爽]：整理者补出的字，保留字本身
HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003134f]")  # 汉字（基本区与扩展区）
CLAUSE_RE = re.compile(r"([^，。？！；：、]+)([，。？！；：、])")  # 一句 + 句末标点
FORMS = {(5, 4): "五言绝句", (7, 4): "七言绝句", (5, 8): "五言律诗", (7, 8): "七言律诗"}  # (每句字数, 句数) -> 体裁
_T2S = opencc.OpenCC("t2s")


def to_simplified(text):
    """繁体 -> 简体（OpenCC 的 t2s 词典，按词转换，比逐字对照准确）。"""
    return _T2S.convert(text)


def strip_notes(text):
    """去掉编者注（括号里的出处、校勘、异文，可能嵌套），[字] 保留字本身，去掉引号。"""
    previous = None
    while previous != text:
        previous, text = text, NOTE_RE.sub("", text)
    return RESTORED_RE.sub(r"\1", text).translate(str.maketrans("", "", "「」『』"))


def split_lines(text):
    """按句末标点切成诗句；文字里有标点以外的非汉字、或不以标点结尾时返回 None。"""
    clauses = CLAUSE_RE.findall(text)
    if not clauses or "".join(line + mark for line, mark in clauses) != text:
        return None
    lines = [line for line, _ in clauses]
    return lines if all(HAN_RE.fullmatch(ch) for line in lines for ch in line) else None


def clean_poem(entry):
    """一条原始条目 -> {"title", "author", "form", "lines"}（简体、去掉编者注）；
    不是规整的五言/七言绝句或律诗（每句字数相同、4 或 8 句）时返回 None。"""
    body = to_simplified(strip_notes("".join(entry.get("paragraphs") or []).strip()))
    lines = split_lines(body)
    if lines is None or (len(lines[0]), len(lines)) not in FORMS or len({len(line) for line in lines}) != 1:
        return None
    return {"title": to_simplified(strip_notes(entry.get("title", ""))).strip(), "author": to_simplified(entry.get("author", "")),
            "form": FORMS[len(lines[0]), len(lines)], "lines": lines}


def dedupe_poems(poems):
    """正文（全部诗句）相同的诗只留第一次出现的那首，顺序不变。"""
    first = {}
    for poem in poems:
        first.setdefault("".join(poem["lines"]), poem)
    return list(first.values())


def poem_text(lines):
    """诗句 -> 统一标点的一行文字：奇数句后是“，”，偶数句后是“。”。"""
    return "".join(line + ("，" if i % 2 == 0 else "。") for i, line in enumerate(lines))


def split_poems(poems, seed=0, fractions=(0.9, 0.05, 0.05)):
    """按首随机切成 train / val / test（同一首诗只在一份里）。返回 {"train": [...], "val": [...], "test": [...]}。"""
    if not math.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions 应为三个正数且和为 1，收到 {fractions}")
    order = np.random.default_rng(seed).permutation(len(poems))
    n_train, n_val = int(fractions[0] * len(poems)), int(fractions[1] * len(poems))
    parts = np.split(order, [n_train, n_train + n_val])
    return {name: [poems[i] for i in idx] for name, idx in zip(("train", "val", "test"), parts)}


def tang_checkpoint_path(profile=None):
    """唐诗字符级 GPT 的检查点：checkpoint_dir()/tang_char_gpt_<配置档>.safetensors（元数据 extra["chars"] 是词表）。"""
    return checkpoint_dir() / f"tang_char_gpt_{get_profile(profile)}.safetensors"


RHYME_GROUPS = {"发花": "a ia ua", "梭波": "o e uo", "乜斜": "ie ve", "一七": "i v er", "姑苏": "u",
                "怀来": "ai uai", "灰堆": "ei uei", "遥条": "ao iao", "油求": "ou iou", "言前": "an ian uan van",
                "人辰": "en in uen vn", "江阳": "ang iang uang", "中东": "eng ing ueng ong iong"}  # 十三辙 -> 韵母
FINAL_TO_GROUP = {final: group for group, finals in RHYME_GROUPS.items() for final in finals.split()}
POEM_RE = re.compile(r"(?:[^，。\n]+，[^，。\n]+。)+")  # 整首诗：若干联“上句，下句。”


@functools.lru_cache(maxsize=None)
def rhyme_groups(char):
    """一个字的所有读音（多音字取全部）落在十三辙的哪几辙，返回 frozenset；没有拼音的字返回空集。"""
    finals = pinyin(char, style=Style.FINALS, heteronym=True, strict=True)[0]
    return frozenset(FINAL_TO_GROUP[f] for f in finals if f in FINAL_TO_GROUP)


def even_lines_rhyme(lines):
    """偶数句（第 2、4、…句）的末字是否同属一辙（多音字只要有一个读音符合）。"""
    ends = [rhyme_groups(line[-1]) for line in lines[1::2]]
    return len(ends) >= 2 and bool(frozenset.intersection(*ends))


def poem_lines(text):
    """一首诗（一行文字）按“，”“。”切成诗句；末尾的标点不产生空句。"""
    return re.split(r"[，。]", text[:-1] if text.endswith(("，", "。")) else text)


def check_poem(text):
    """一首生成的诗（一行文字，不含换行）-> 各项检查是否通过：
    line length 每句字数相同且是 5 或 7；line count 4 或 8 句；punctuation 由“上句，下句。”组成、没有别的字符；
    rhyme 偶数句押韵（十三辙）；all 全部通过。"""
    lines = poem_lines(text)
    lengths = {len(line) for line in lines}
    result = {"line length": len(lengths) == 1 and lengths <= {5, 7},
              "line count": len(lines) in (4, 8),
              "punctuation": POEM_RE.fullmatch(text) is not None and all(HAN_RE.fullmatch(c) for c in text if c not in "，。"),
              "rhyme": all(line for line in lines) and even_lines_rhyme(lines)}
    result["all"] = all(result.values())
    return result


def format_constraint(tokenizer, prompt_len, lengths, counts, rhyme=False):
    """约束解码用的 allowed(idx)（配合 generate(..., allowed=...)，只适用于一个字一个 token 的分词器）：
    第 b 行写 counts[b] 句、每句 lengths[b] 个字，句末依次强制“，”“。”，写完强制换行（结束）；其余位置只许汉字。
    rhyme=True 时，偶数句的末字还必须与前面各偶数句的末字同属一辙（十三辙），于是 even_lines_rhyme 一定为真。"""
    chars = tokenizer.chars
    han = torch.tensor([bool(HAN_RE.fullmatch(c)) for c in chars])
    only = lambda ch: torch.tensor([c == ch for c in chars])
    by_kind = torch.stack([han, only("，"), only("。"), only("\n")])  # 0 汉字，1 逗号，2 句号，3 换行
    group_ids = {g: i for i, g in enumerate(RHYME_GROUPS)}
    groups = torch.tensor([sum(1 << group_ids[g] for g in rhyme_groups(c)) if len(c) == 1 else 0 for c in chars])
    lengths, counts = torch.as_tensor(lengths), torch.as_tensor(counts)

    def allowed(idx):
        k = torch.full_like(lengths, idx.shape[1] - prompt_len)  # 每行已经生成的字数（一字一 token）
        line, pos = k // (lengths + 1), k % (lengths + 1)
        kind = torch.where(line >= counts, 3, torch.where(pos < lengths, 0, 1 + line % 2))
        mask = by_kind[kind].to(idx.device)
        if rhyme:  # 偶数句的末字：与前面各偶数句的末字有一个共同的辙（第 2 句的末字只要求有辙可查）
            target = torch.full_like(lengths, (1 << len(RHYME_GROUPS)) - 1)
            for earlier in (1, 3, 5):  # 第 2、4、6 句
                where = (prompt_len + earlier * (lengths + 1) + lengths - 1).clamp(max=idx.shape[1] - 1)
                end = idx.gather(1, where[:, None].to(idx.device))[:, 0].cpu()
                target = torch.where(line > earlier, target & groups[end], target)
            rhyming = (kind == 0) & (pos == lengths - 1) & (line % 2 == 1)
            same = (groups[None, :] & target[:, None]) != 0
            mask = torch.where(rhyming[:, None].to(idx.device), mask & same.to(idx.device), mask)
        return mask
    return allowed


# ---- 06_finetuning/bonus_tang_poetry_sft_rl.ipynb ----
def load_tang_splits(seed=0):
    """上一本的数据流程一次做完：读《全唐诗》、clean_poem、dedupe_poems、split_poems，返回 {"train", "val", "test"}。"""
    cleaned = [poem for poem in map(clean_poem, load_tang_poems()) if poem is not None]
    return split_poems(dedupe_poems(cleaned), seed)


INSTRUCTION_HEADER = "### Instruction:\n"  # 与第 6 章相同的标题；回答前的标题是 shared.instruct.RESPONSE_HEADER


def poem_prompt(instruction):
    """第 6 章的提示词格式（去掉英文前言）：### Instruction: 指令，### Response: 之后由模型续写。"""
    return INSTRUCTION_HEADER + instruction + RESPONSE_HEADER


def poem_instruction(poem, kind):
    """由一首真诗造一条指令数据 {"kind", "instruction", "output", ...}，output 按构造满足 instruction：
    "acrostic" 藏头（heads 为各句首字），"title" 以题目命题，"continue" 给出第一句、续写其余各句。"""
    lines, form = poem["lines"], poem["form"]
    text = poem_text(lines)
    if kind == "acrostic":
        heads = "".join(line[0] for line in lines)
        return {"kind": kind, "instruction": f"写一首{form}，藏头：{heads}", "output": text, "heads": heads,
                "length": len(lines[0])}
    if kind == "title":
        return {"kind": kind, "instruction": f"以《{poem['title']}》为题写一首{form}", "output": text, "form": form}
    if kind == "continue":
        return {"kind": kind, "instruction": f"续写：{lines[0]}，", "output": text[len(lines[0]) + 1:], "first": lines[0]}
    raise ValueError(f"未知的指令类型 {kind!r}；可选 acrostic / title / continue")


def follows_instruction(example, response):
    """回答是否满足指令（只查程序能查的部分）：格式（字数、句数、标点）都对，而且
    藏头：各句首字依次是 heads、每句 length 个字；命题：体裁对；续写：接上第一句后是一首完整的诗。"""
    kind = example["kind"]
    text = example["first"] + "，" + response if kind == "continue" else response
    lines, checks = poem_lines(text), check_poem(text)
    if not (checks["line length"] and checks["line count"] and checks["punctuation"]):
        return False
    if kind == "acrostic":
        return "".join(line[0] for line in lines) == example["heads"] and len(lines[0]) == example["length"]
    if kind == "title":
        return FORMS[len(lines[0]), len(lines)] == example["form"]
    return True


def extend_vocab(tokenizer, model, text):
    """把 text 里词表没有的字符追加到字符级 tokenizer 的末尾（原有 id 不变），模型的嵌入（与共享权重的输出层）同步加行，
    新行取原有各行的平均值。返回新加的字符。"""
    new = sorted(set(text) - set(tokenizer.ids))
    for ch in new:
        tokenizer.ids[ch] = len(tokenizer.chars)
        tokenizer.chars.append(ch)
    old = model.tok_emb.weight.data
    if len(old) != len(tokenizer.chars) - len(new) or not model.cfg.get("tie_weights", True):
        raise ValueError("模型的词表行数与 tokenizer 不一致，或输出层没有与嵌入共享权重")
    model.tok_emb = torch.nn.Embedding(len(tokenizer.chars), old.shape[1]).to(old.device)
    model.tok_emb.weight.data = torch.cat([old, old.mean(dim=0).expand(len(new), -1)])
    model.out_head.weight = model.tok_emb.weight
    model.cfg["vocab_size"] = len(tokenizer.chars)
    return new


def acrostic_reward(text, heads, length):
    """藏头绝句的可验证奖励。text：模型写的诗（一行，不含换行），heads：藏头字，length：每句字数。
    返回 {"acrostic": 首字对了的句数比例, "format", "rhyme", "repeated", "success", "reward"}：
    format = 句数等于藏头字数、每句 length 个字、标点是“上句，下句。”；rhyme = 偶数句押韵（十三辙）且末字互不相同；
    repeated = 有完全相同的两句；reward = (acrostic + format + rhyme) / 3，有重复句时为 0；success = 全部满足。"""
    lines = poem_lines(text)
    checks = check_poem(text)
    form_ok = checks["punctuation"] and len(lines) == len(heads) and all(len(line) == length for line in lines)
    acrostic = sum(line[:1] == head for line, head in zip(lines, heads)) / len(heads)
    ends = [line[-1:] for line in lines[1::2]]
    rhyme = checks["rhyme"] and len(set(ends)) == len(ends)
    repeated = len(set(lines)) < len(lines)
    reward = 0.0 if repeated else (acrostic + form_ok + rhyme) / 3
    return {"acrostic": acrostic, "format": form_ok, "rhyme": rhyme, "repeated": repeated,
            "success": acrostic == 1 and form_ok and rhyme and not repeated, "reward": reward}


def distinct_n(texts, n=2):
    """多样性：这些诗里所有（不跨标点的）字 n 元组中，不同的占多少。全是同一首诗时很低，每首都不一样时接近 1。"""
    grams = [line[i:i + n] for text in texts for line in poem_lines(text) for i in range(len(line) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
