"""字节级 BPE 分词器 (byte-level BPE tokenizer)，与 tiktoken 的 GPT-2 逐 id 一致；在 02_data_engineering/bonus_bpe_from_scratch 中讲解。
- ``bytes_to_unicode`` / ``token_to_str``：GPT-2 的字节→可打印字符表（``Ġ`` 就是空格）；
- ``GPT2_SPLIT_RE`` / ``split_text``：GPT-2 的预分词正则，只用标准库 ``re`` 实现；
- ``train_simple`` / ``train_fast``：朴素与快速训练（并列规则相同，合并列表逐个相同）；
- ``BPETokenizer``：encode / encode_ordinary / decode、特殊 token、按 GPT-2 格式 save / load；
- ``load_gpt2_bpe``：读取 GPT-2 官方 vocab.bpe 与 encoder.json；``readable_pieces``：不乱码地显示 token。"""
import heapq
import json
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from .download import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, download
from .runtime import atomic_write

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 02_data_engineering/bonus_bpe_from_scratch.ipynb ----
def bytes_to_unicode():
    """GPT-2 的字节→可打印字符表：可打印的 188 个字节保持原样，其余 68 个依次映射到 U+0100 之后。"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    remapped = iter(range(256, 512))  # 不可打印的字节依次取 U+0100、U+0101……
    return {b: chr(b) if b in printable else chr(next(remapped)) for b in range(256)}


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def token_to_str(token):
    """把 token 的字节串写成 GPT-2 词表文件里的样子，例如 b" the" -> "Ġthe"。"""
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def str_to_token(s, where=""):
    """``token_to_str`` 的逆运算；遇到表外字符说明文件损坏，抛出 ValueError。"""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{where}字符 {e.args[0]!r} 不在 GPT-2 的字节表里，文件是否已损坏？") from None


# Unicode 的 White_Space 属性（Rust regex 与 tiktoken 的 \s）；注意它不含 \x1c-\x1f
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _letter_and_number_classes():
    """按 unicodedata 把所有字母 (L*) 与数字 (N*) 码位写成正则字符类的内容（若干区间）。"""
    ranges = {"L": [], "N": []}
    for cp in range(sys.maxunicode + 1):
        spans = ranges.get(unicodedata.category(chr(cp))[0])
        if spans and spans[-1][1] == cp - 1:  # spans 为 None：既不是字母也不是数字
            spans[-1][1] = cp
        elif spans is not None:
            spans.append([cp, cp])
    return tuple("".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges[c])
                 for c in "LN")


LETTER, NUMBER = _letter_and_number_classes()
GPT2_SPLIT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    rf"| ?[{LETTER}]+| ?[{NUMBER}]+| ?[^{WHITESPACE}{LETTER}{NUMBER}]+"
    rf"|[{WHITESPACE}]+(?![^{WHITESPACE}])|[{WHITESPACE}]+"
)
GPT2_SPLIT_RE = re.compile(GPT2_SPLIT_PATTERN)


def split_text(text):
    """GPT-2 的预分词：把文本切成块，BPE 只在块内合并。"""
    return GPT2_SPLIT_RE.findall(text)


def get_pair_counts(ids, counts=None):
    """统计 ids 中相邻对的出现次数（重叠的也算），可累加到已有的 counts 里。"""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, new_id):
    """从左到右、不重叠地把 ids 中所有的 pair 换成 new_id，返回新列表。"""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def check_vocab_size(vocab_size):
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size 必须是不小于 256 的整数（256 个单字节本身就占了 256 个 id），收到 {vocab_size!r}")


def pair_sort_key(pair, count, vocab):
    """并列规则：次数多者优先；次数相同按（左字节串, 右字节串）字典序取小。键越小越优先。"""
    return (-count, vocab[pair[0]], vocab[pair[1]])


def _no_more_pairs(n_merges, vocab_size):
    return ValueError(f"语料太小：学了 {n_merges} 个合并后已没有相邻的 token 对，达不到 vocab_size={vocab_size}；请换更大的语料或更小的词表")


def train_simple(text, vocab_size):
    """朴素 BPE 训练：每一步都重新统计全部相邻对。返回合并列表 [(a, b), ...]，第 k 个产生 id 256+k。"""
    check_vocab_size(vocab_size)
    chunks = [list(chunk.encode("utf-8")) for chunk in split_text(text)]
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for ids in chunks:
            get_pair_counts(ids, counts)
        if not counts:
            raise _no_more_pairs(len(merges), vocab_size)
        pair = min(counts, key=lambda p: pair_sort_key(p, counts[p], vocab))
        chunks = [merge(ids, pair, new_id) for ids in chunks]
        merges.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
    return merges


def merge_in_place(ids, pair, new_id, deltas):
    """把 ids 中的 pair 从左到右原地换成 new_id，并把相邻对次数的变化（每处一次）记入 deltas。"""
    a, b = pair
    i = 0
    while True:
        try:
            i = ids.index(a, i)
        except ValueError:
            return
        if i + 1 < len(ids) and ids[i + 1] == b:
            deltas[pair] -= 1
            if i > 0:
                deltas[ids[i - 1], a] -= 1
                deltas[ids[i - 1], new_id] += 1
            if i + 2 < len(ids):
                deltas[b, ids[i + 2]] -= 1
                deltas[new_id, ids[i + 2]] += 1
            ids[i:i + 2] = [new_id]
        i += 1


def train_fast(text, vocab_size):
    """快速 BPE 训练：预分词块去重计数 + 只增量更新受影响的计数 + 懒删除堆；并列规则同 ``train_simple``，合并列表也相同。"""
    check_vocab_size(vocab_size)
    chunk_counts = Counter(split_text(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts, where = defaultdict(int), defaultdict(set)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += freqs[w]
            where[pair].add(w)
    vocab = [bytes([i]) for i in range(256)]
    heap = [(*pair_sort_key(p, c, vocab), p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    for new_id in range(256, vocab_size):
        while heap and pair_counts.get(heap[0][-1], 0) != -heap[0][0]:
            heapq.heappop(heap)  # 过期的元素：计数已变
        if not heap:
            raise _no_more_pairs(len(merges), vocab_size)
        pair = heapq.heappop(heap)[-1]
        merges.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        changed = set()
        for w in where.pop(pair):
            deltas = defaultdict(int)
            merge_in_place(words[w], pair, new_id, deltas)
            for p, d in deltas.items():
                if d:
                    pair_counts[p] += d * freqs[w]
                    changed.add(p)
                    if d > 0:
                        where[p].add(w)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (*pair_sort_key(p, pair_counts[p], vocab), p))
            else:
                del pair_counts[p]
    return merges


class BPETokenizer:
    """GPT-2 式字节级 BPE 分词器。
    ``merges``：[(a, b), ...]，第 k 个合并产生 id 256+k；``byte_order``：id 0..255 各对应哪个字节
    （我们训练的是恒等顺序，GPT-2 官方词表是另一种排列）；``special_tokens``：{字符串: id}。"""

    def __init__(self, merges, byte_order=range(256), special_tokens=None):
        byte_order = list(byte_order)
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order 必须恰好是 0..255 的一个排列")
        self.merges = [tuple(p) for p in merges]
        self.vocab = [bytes([b]) for b in byte_order]  # id -> 字节串
        self.ranks = {token: i for i, token in enumerate(self.vocab)}  # 字节串 -> id（也是合并的优先级）
        for a, b in self.merges:
            if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)):
                raise ValueError(f"第 {len(self.vocab) - 255} 个合并 ({a}, {b}) 引用了尚不存在的 id")
            token = self.vocab[a] + self.vocab[b]
            if token in self.ranks:
                raise ValueError(f"合并 ({a}, {b}) 产生的 {token!r} 已在词表中（重复的合并）")
            self.ranks[token] = len(self.vocab)
            self.vocab.append(token)
        self.special_tokens = dict(special_tokens or {})
        ids = list(self.special_tokens.values())
        for name, i in self.special_tokens.items():
            if not isinstance(i, int) or i < len(self.vocab) or ids.count(i) > 1:
                raise ValueError(f"特殊 token {name!r} 的 id {i!r} 与其他 token 冲突（必须 ≥ {len(self.vocab)} 且互不相同）")
        self.special_bytes = {i: name.encode("utf-8") for name, i in self.special_tokens.items()}
        self.cache = {}  # 预分词块 -> id 列表

    @property
    def n_vocab(self):
        return len(self.vocab) + len(self.special_tokens)

    def bpe(self, piece):
        """把一个块（字节串）编码成 id 列表：反复合并排名最小的相邻对（并列取最左）。"""
        ranks = self.ranks
        if piece in ranks:
            return [ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best is None or rank < best):
                    best, best_i = rank, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [ranks[p] for p in parts]

    def encode_ordinary(self, text):
        """编码普通文本（特殊 token 的字符串也按普通文字处理）。"""
        cache, ids = self.cache, []
        if len(cache) > 500_000:  # 防止缓存无限增长
            cache.clear()
        for chunk in GPT2_SPLIT_RE.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self.bpe(chunk.encode("utf-8"))
            ids.extend(chunk_ids)
        return ids

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """与 ``tiktoken.Encoding.encode`` 的约定相同：默认文本中出现特殊 token 就报错。"""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if unknown := allowed - set(self.special_tokens):
            raise ValueError(f"allowed_special 里有本分词器没有的特殊 token：{sorted(unknown)}")
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        for name in sorted(disallowed):
            if name in text:
                raise ValueError(f"文本中出现了特殊 token {name!r}，但它不在 allowed_special 里。若要编码成特殊 id，请传 "
                                 f"allowed_special={{{name!r}}}；若只是普通文字，请传 disallowed_special=() 或使用 encode_ordinary。")
        if not allowed:
            return self.encode_ordinary(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids = []
        for k, part in enumerate(re.split(pattern, text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids):
        out = []
        for i in ids:
            token = self.vocab[i] if 0 <= i < len(self.vocab) else self.special_bytes.get(i)
            if token is None:
                raise ValueError(f"未知的 token id：{i!r}（词表大小 {self.n_vocab}）")
            out.append(token)
        return b"".join(out)

    def decode(self, ids):
        """解码成字符串；不完整的 UTF-8 字节显示为 U+FFFD（与 tiktoken 相同）。"""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory):
        """按 GPT-2 的格式写出 ``vocab.bpe`` 与 ``encoder.json``（原子写入），返回两个路径。"""
        directory = Path(directory)  # 目录不存在时 atomic_write 会创建
        lines = ["#version: 0.2"] + [f"{token_to_str(self.vocab[a])} {token_to_str(self.vocab[b])}"
                                     for a, b in self.merges]
        encoder = {token_to_str(t): i for i, t in enumerate(self.vocab)} | self.special_tokens
        paths = directory / "vocab.bpe", directory / "encoder.json"
        atomic_write(paths[0], lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
        atomic_write(paths[1], lambda tmp: tmp.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8"))
        return paths

    @classmethod
    def load(cls, vocab_bpe, encoder_json):
        """读取 GPT-2 格式的 ``vocab.bpe`` + ``encoder.json``；格式不对或两者矛盾时抛出 ValueError。"""
        bpe_name, json_name = Path(vocab_bpe).name, Path(encoder_json).name
        try:
            encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_name} 不是合法的 JSON：{e}") from None
        if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
            raise ValueError(f"{json_name} 应是 {{token 字符串: 整数 id}} 的字典")
        byte_order = [None] * 256
        for b, c in BYTE_TO_UNICODE.items():
            i = encoder.get(c)
            if i is None or not 0 <= i < 256 or byte_order[i] is not None:
                raise ValueError(f"{json_name} 中单字节 token {c!r} 的 id 缺失、重复或不在 0..255")
            byte_order[i] = b
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        first = 1 if lines and lines[0].startswith("#version") else 0
        if lines[-1] == "":
            lines.pop()
        known = {bytes([b]): i for i, b in enumerate(byte_order)}
        merges = []
        for n, line in enumerate(lines[first:], start=first + 1):
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{bpe_name} 第 {n} 行应是以一个空格分隔的两个 token，实际是 {line!r}")
            left, right = (str_to_token(p, f"{bpe_name} 第 {n} 行：") for p in parts)
            if left not in known or right not in known:
                raise ValueError(f"{bpe_name} 第 {n} 行用到了前面没有定义的 token：{line!r}")
            if left + right in known:
                raise ValueError(f"{bpe_name} 第 {n} 行是重复的合并：{line!r}")
            known[left + right] = 256 + len(merges)
            merges.append((known[left], known[right]))
        vocab_strings = [token_to_str(t) for t in known]  # known 按插入顺序就是 id 顺序
        for i, s in enumerate(vocab_strings):
            if encoder.get(s) != i:
                raise ValueError(f"{bpe_name} 与 {json_name} 不一致：token {s!r} 应为 id {i}")
        ordinary = set(vocab_strings)
        special = {s: i for s, i in encoder.items() if s not in ordinary}
        return cls(merges, byte_order, special)


def load_gpt2_bpe():
    """读取 GPT-2 官方的 vocab.bpe 与 encoder.json（经 shared.download，支持离线镜像）。"""
    return BPETokenizer.load(download(GPT2_VOCAB_BPE), download(GPT2_ENCODER_JSON))


def readable_pieces(tokenizer, ids):
    """把 id 序列分成“能独立解码成完整 UTF-8 字符”的最短小组，返回 [(字符串, token 个数), ...]。
    单个字节级 token 可能只含半个汉字，单独解码会变成 U+FFFD；凑齐完整字符再显示就不会乱码。"""
    pieces, buffer, count = [], b"", 0
    for i in ids:
        buffer, count = buffer + tokenizer.decode_bytes([i]), count + 1
        try:
            pieces.append((buffer.decode("utf-8"), count))
            buffer, count = b"", 0
        except UnicodeDecodeError:
            continue
    if buffer:
        pieces.append((buffer.decode("utf-8", errors="replace"), count))
    return pieces
