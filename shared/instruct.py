"""指令微调：Alpaca 提示词格式、近似重复检测（MinHash + LSH）、自定义整理函数（动态填充、右移目标、-100 掩码、提示词掩码）、
回答生成与提取、格式检查、ROUGE-L / token-F1、指令模型的保存，以及可选的本地 Ollama 评审，
在 06_finetuning/02_instruction 中讲解。"""
import hashlib
import itertools
import json
import random
import re
import urllib.error
import urllib.request
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from .checkpoint import save_checkpoint
from .download import INSTRUCTION_DATA, download
from .generate import generate
from .runtime import checkpoint_dir, get_profile
from .tokenizer import EOT_ID
from .train import IGNORE_INDEX

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/02_instruction.ipynb ----
def load_instruction_data(url=INSTRUCTION_DATA, fields=("instruction", "input", "output")):
    """读取 instruction-data.json（或 url 处同样格式的文件）：每条都含 fields 各字段的字典组成的列表。"""
    data = json.loads(download(url).read_text(encoding="utf-8"))
    for i, entry in enumerate(data):
        if not set(fields) <= set(entry):
            raise ValueError(f"第 {i} 条缺少 {'/'.join(fields)} 字段：{entry}")
    return data


RESPONSE_HEADER = "\n\n### Response:\n"


def format_input(entry):
    """Alpaca 格式的提示词（不含 Response 标题）。"""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def format_prompt(entry):
    """推理时交给模型的完整提示词：format_input + "### Response:" 标题，回答从这里开始续写。"""
    return format_input(entry) + RESPONSE_HEADER


def split_instruction_data(data, fractions=(0.85, 0.05, 0.10), seed=123):
    """固定种子打乱后切成 (train, val, test)；测试集取剩下的全部，保证三份不重不漏。"""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions 应是三个加起来为 1 的比例，收到 {fractions}")
    order = np.random.default_rng(seed).permutation(len(data))
    n_train, n_val = int(fractions[0] * len(data)), int(fractions[1] * len(data))
    pick = lambda idx: [data[i] for i in idx]
    return pick(order[:n_train]), pick(order[n_train:n_train + n_val]), pick(order[n_train + n_val:])


def normalize_text(text):
    """小写、只留字母数字、用单个空格连接：只差大小写、标点或空白的两段文本规范化后完全相同。"""
    return " ".join(re.findall(r"\w+", text.lower()))


def shingles(text, n=3):
    """规范化后的词 n 元组 (word n-gram) 集合；不足 n 个词的文本整体算一个元素。"""
    words = normalize_text(text).split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a, b):
    """两个集合的 Jaccard 相似度 |A∩B| / |A∪B|；两个都是空集时为 1。"""
    return len(a & b) / len(a | b) if a | b else 1.0


MERSENNE = (1 << 61) - 1  # 一个大素数：哈希函数 h(x) = (a·x + b) mod p


def minhash(items, num_hashes=64, seed=0):
    """MinHash 签名：num_hashes 个随机哈希函数下集合元素的最小哈希值（长度 num_hashes 的元组）。"""
    rng = random.Random(seed)  # 固定种子：不同文本用同一组哈希函数，签名才可比
    params = [(rng.randrange(1, MERSENNE), rng.randrange(MERSENNE)) for _ in range(num_hashes)]
    base = [int.from_bytes(hashlib.blake2b(x.encode("utf-8"), digest_size=8).digest(), "little") for x in items]
    return tuple(min((a * x + b) % MERSENNE for x in base) for a, b in params)


def near_duplicates(texts, threshold=0.8, n=3, num_hashes=64, bands=16):
    """Jaccard 相似度 >= threshold 的文本对 [(i, j, J), ...]，i < j，按 J 从大到小排列。
    先用 MinHash + LSH（签名切成 bands 段，任一段相同即为候选）找候选对，再对候选对精确计算 Jaccard。"""
    if num_hashes % bands:
        raise ValueError(f"num_hashes={num_hashes} 必须能被 bands={bands} 整除")
    sets = [shingles(t, n) for t in texts]
    signatures = [minhash(s, num_hashes) for s in sets]
    rows, candidates = num_hashes // bands, set()
    for band in range(bands):
        buckets = defaultdict(list)
        for i, sig in enumerate(signatures):
            buckets[sig[band * rows:(band + 1) * rows]].append(i)
        for group in buckets.values():
            candidates.update(itertools.combinations(group, 2))
    pairs = ((i, j, jaccard(sets[i], sets[j])) for i, j in candidates)
    return sorted((p for p in pairs if p[2] >= threshold), key=lambda p: (-p[2], p[0], p[1]))


class InstructionDataset(Dataset):
    """每条样本编码为 (token_ids, prompt_len)：token_ids = 提示词 + 回答，前 prompt_len 个属于提示词。"""

    def __init__(self, data, tokenizer):
        self.items = []
        for entry in data:
            prompt = tokenizer.encode(format_prompt(entry))
            self.items.append((prompt + tokenizer.encode(entry["output"]), len(prompt)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_instruction(batch, pad_id=EOT_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None, mask_prompt=False):
    """[(token_ids, prompt_len), ...] -> (inputs, targets)，形状都是 (B, T)，T = 本批最长序列长度（再截断）。
    目标 = 输入右移一位；第一个结束符之后的填充、以及（mask_prompt=True 时）提示词部分的目标都记为 ignore_index。"""
    if any(len(ids) == 0 for ids, _ in batch):
        raise ValueError("批次中有空序列")
    width = max(len(ids) for ids, _ in batch)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        inputs[row, :len(ids)] = torch.tensor(ids)
        targets[row, :len(ids)] = torch.tensor(list(ids[1:]) + [pad_id])  # 右移一位，最后一个目标是结束符
        if mask_prompt:
            targets[row, :prompt_len - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def extract_response(full_text, prompt):
    """从“提示词 + 生成内容”的解码文本中取出回答：去掉提示词前缀、开头多余的 "### Response:" 标题与首尾空白。"""
    if not full_text.startswith(prompt):
        raise ValueError("生成的文本不以提示词开头；请传入完整的解码结果与同一个提示词")
    response = full_text[len(prompt):].split("<|endoftext|>")[0]
    return response.removeprefix("### Response:").strip()


@torch.no_grad()
def generate_response(model, entry, tokenizer, device, max_new_tokens, context_size, eos_id=EOT_ID):
    """贪心解码一条回答，返回 {"response", "ended"}；ended 表示模型自己输出了结束符（而不是被长度截断）。"""
    prompt = format_prompt(entry)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    out = generate(model, idx, max_new_tokens=max_new_tokens, context_size=context_size, eos_id=eos_id)
    new_tokens = out[0, idx.shape[1]:].tolist()
    ended = eos_id in new_tokens
    if ended:
        new_tokens = new_tokens[:new_tokens.index(eos_id)]
    return {"response": extract_response(prompt + tokenizer.decode(new_tokens), prompt), "ended": ended}


def instruct_checkpoint_path(profile=None):
    """指令微调模型的检查点路径：checkpoint_dir()/ch06_instruct_<配置档>.safetensors（默认为当前配置档）。"""
    return checkpoint_dir() / f"ch06_instruct_{get_profile(profile)}.safetensors"


def save_instruct_model(model, source, profile=None):
    """保存指令微调后的模型（safetensors，元数据含模型配置与起点来源 source），返回路径。用 load_model 读回。"""
    path = instruct_checkpoint_path(profile)
    save_checkpoint(path, model, extra={"base_model": source})
    return path


PROMPT_MARKERS = ("### Instruction", "### Input", "### Response", "Below is an instruction")


def has_prompt_echo(response):
    """回答里是否又出现了提示词模板的片段。"""
    return any(marker in response for marker in PROMPT_MARKERS)


def is_well_formed(response, ended):
    """格式规范：模型自己输出了结束符、回答非空、且没有回显提示词模板。"""
    return ended and bool(response.strip()) and not has_prompt_echo(response)


def words(text):
    """小写后按单词切分（只保留字母数字），用于 token-F1 与 ROUGE-L。"""
    return re.findall(r"\w+", text.lower())


def f1_score(common, pred, ref):
    """精确率 common/len(pred) 与召回率 common/len(ref) 的调和平均；两者都为空时为 1，只有一方为空或 common=0 时为 0。"""
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction, reference):
    """词袋 F1（SQuAD 式）：公共单词的个数（按出现次数计）作为 f1_score 的 common。"""
    pred, ref = words(prediction), words(reference)
    return f1_score(sum(min(pred.count(w), ref.count(w)) for w in set(pred)), pred, ref)


def lcs_length(a, b):
    """最长公共子序列的长度（动态规划，O(len(a)·len(b))）。"""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F1：单词级最长公共子序列的长度作为 f1_score 的 common。"""
    pred, ref = words(prediction), words(reference)
    return f1_score(lcs_length(pred, ref), pred, ref)


OLLAMA_URL = "http://localhost:11434"


def ollama_models(url=OLLAMA_URL, timeout=1.0):
    """本地 Ollama 服务上可用的模型名列表；服务不可达时返回 None。"""
    try:
        with urllib.request.urlopen(f"{url}/api/tags", timeout=timeout) as response:
            return [m["name"] for m in json.loads(response.read())["models"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def ollama_score(entry, response, model, url=OLLAMA_URL, timeout=120):
    """请 Ollama 上的 model 给回答打 0-100 分；解析不出分数时返回 None。"""
    prompt = (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
              f"score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
              "Respond with the integer number only.")
    payload = json.dumps({"model": model, "prompt": prompt, "stream": False,
                          "options": {"temperature": 0, "seed": 123}}).encode("utf-8")
    request = urllib.request.Request(f"{url}/api/generate", data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        match = re.search(r"\d+", json.loads(r.read())["response"])
    return min(100, int(match.group())) if match else None
