"""文本生成：token 与文本互转、贪心/温度/top-k/top-p 采样、重复惩罚与束搜索，在 05_pretraining 中讲解。"""
import math

import torch

from .runtime import eval_mode

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/01_pretraining.ipynb ----
def text_to_token_ids(text, tokenizer):
    """文本 -> 形状 (1, T) 的 token id 张量（允许出现 <|endoftext|>）。"""
    try:
        ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    except TypeError:  # 不是 tiktoken 的分词器
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(ids, tokenizer):
    """形状 (T,) 或 (1, T) 的 token id -> 文本。"""
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"只能解码一条序列，收到的批大小为 {ids.shape[0]}；请逐行调用")
        ids = ids[0]
    return tokenizer.decode(ids.tolist())


def apply_repetition_penalty(logits, idx, penalty):
    """CTRL 式重复惩罚：在 idx 中出现过的 token，正 logit 除以 penalty、负 logit 乘以 penalty。

    penalty > 1 时这些 token 的 logit 一定变小（概率降低），penalty = 1 不变。logits: (b, V)，idx: (b, T)。
    """
    if penalty == 1.0 or idx.shape[1] == 0:
        return logits
    score = logits.gather(-1, idx)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(-1, idx, score)


def top_k_filter(logits, k):
    """只保留最大的 k 个 logit，其余设为 -inf（与第 k 大并列的也保留）。"""
    if k is None:
        return logits
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """核采样 (nucleus)：按概率从大到小排序，保留累计概率刚好达到 p 的最小集合，其余设为 -inf。"""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # 排在它前面的 token 的累计概率
    sorted_logits = sorted_logits.masked_fill(before >= p, float("-inf"))  # 前面已经够 p 了，它就多余
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (b, V) -> 下一个 token (b, 1)：temperature == 0 时取最大（贪心）；
    否则除以 temperature，经 top-k、top-p 过滤后按 softmax 概率抽样（generator 控制随机数，便于复现）。"""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


def next_token_logits(model, tokens, context_size, cache=None):
    """已有 tokens (b, T) 时，下一个 token 的 logits (b, V)，float32。生成的每一步都只调用它一次。

    没有缓存：把最后 context_size 个 token 整段送入模型（滑动窗口）；
    有 KV 缓存：只送入缓存里还没有的 token（第一次是整个提示词，即预填充；之后每步 1 个）。
    """
    if cache is None:
        return model(tokens[:, -context_size:])[:, -1].float()
    return model(tokens[:, cache.pos:], cache=cache)[:, -1].float()


def make_cache_if_fits(model, batch_size, needed, context_size, use_cache=True):
    """模型支持 KV 缓存（有 make_cache 方法）、且 needed 个位置不超过 context_size 时建一个缓存，否则返回 None。

    超出时只能用滑动窗口：窗口一移动，每个 token 的位置都变了，缓存里的 K、V 全部作废。
    """
    if use_cache and hasattr(model, "make_cache") and needed <= context_size:
        return model.make_cache(batch_size, needed)
    return None


def _context_size(model, context_size):
    if context_size is None:
        context_size = getattr(model, "cfg", {}).get("context_length")
    if not (isinstance(context_size, int) and context_size >= 1):
        raise ValueError(f"context_size 必须是正整数（模型没有 cfg['context_length'] 时必须给出），收到 {context_size!r}")
    return context_size


def _check_generate_args(idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0):
    if not (torch.is_tensor(idx) and idx.dim() == 2 and idx.dtype == torch.long):
        raise ValueError("idx 必须是形状 (batch, T) 的 torch.long 张量，例如 text_to_token_ids(...) 的结果")
    if idx.shape[1] == 0:
        raise ValueError("idx 至少要有一个 token 作为开头")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens 必须是非负整数，收到 {max_new_tokens!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature 必须是有限的非负数（0 表示贪心），收到 {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k 必须是正整数或 None，收到 {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p 必须在 (0, 1] 之间或为 None，收到 {top_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty 必须 > 0（1.0 表示不惩罚），收到 {repetition_penalty!r}")


@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, top_p=None,
             repetition_penalty=1.0, eos_id=None, generator=None, use_cache=True, on_token=None, allowed=None):
    """自回归生成 max_new_tokens 个 token，返回 (batch, T + 新 token 数)。课程里所有的解码都用它。

    每一步：next_token_logits -> 重复惩罚 -> sample_next（贪心或温度 + top-k + top-p 采样）。
    context_size 默认为 model.cfg["context_length"]。use_cache=True 时，只要模型有 make_cache 且序列装得下，
    就用 KV 缓存（结果与不用缓存相同，只是更快）；装不下时退回滑动窗口。
    给出 eos_id 时，某一行生成 eos 后该行之后都填 eos_id，所有行都结束就提前停止（eos 保留在结果中）。
    给出 on_token 时，每生成一步就调用 on_token(next_id)（形状 (batch, 1)），可以边生成边输出（流式）；它返回真值时提前停止。
    给出 allowed 时，每一步只在 allowed(idx)（形状 (batch, V) 的布尔张量）为真的 token 里选：约束解码（唐诗选读）。
    生成期间模型临时处于 eval 模式。
    """
    context_size = _context_size(model, context_size)
    _check_generate_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens == 0:
        return idx
    batch_size, prompt_len = idx.shape
    cache = make_cache_if_fits(model, batch_size, prompt_len + max_new_tokens - 1, context_size, use_cache)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=idx.device)
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = apply_repetition_penalty(next_token_logits(model, idx, context_size, cache), idx, repetition_penalty)
            if allowed is not None:
                mask = allowed(idx)
                if not mask.any(dim=-1).all():
                    raise ValueError("allowed(idx) 给某一行的 token 全是 False：每行至少要允许一个 token")
                logits = logits.masked_fill(~mask, float("-inf"))
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished[:, None], eos_id)
                finished |= next_id[:, 0] == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            if on_token is not None and on_token(next_id):
                break
            if eos_id is not None and finished.all():
                break
    return idx


@torch.no_grad()
def beam_search(model, idx, max_new_tokens, context_size=None, *, num_beams, length_penalty=1.0, eos_id=None,
                return_score=False, use_cache=True):
    """束搜索 (beam search)：每步保留总对数概率最高的 num_beams 条候选，返回得分最高的序列 (1, T')。

    得分 = 新 token 的对数概率之和 / (新 token 数 ** length_penalty)。给出 eos_id 时，
    以 eos 结尾的候选不再扩展；攒够 num_beams 条结束的候选就停止。num_beams=1 就是贪心解码。
    每步与 generate 一样只调用一次 next_token_logits；用缓存时，缓存的行随候选的来源重新排列。
    """
    context_size = _context_size(model, context_size)
    _check_generate_args(idx, max_new_tokens)
    if idx.shape[0] != 1:
        raise ValueError(f"beam_search 一次只处理一条提示，收到批大小 {idx.shape[0]}")
    if not (isinstance(num_beams, int) and num_beams >= 1):
        raise ValueError(f"num_beams 必须是正整数，收到 {num_beams!r}")
    prompt_len = idx.shape[1]
    cache = make_cache_if_fits(model, 1, prompt_len + max_new_tokens - 1, context_size, use_cache)
    beams, scores = idx, torch.zeros(1, device=idx.device)  # 存活的候选及其对数概率之和
    finished = []  # (归一化得分, 序列)

    def normalized(score, seq_len):
        return score / max(1, seq_len - prompt_len) ** length_penalty

    with eval_mode(model):
        for _ in range(max_new_tokens):
            logprobs = torch.log_softmax(next_token_logits(model, beams, context_size, cache), dim=-1)
            vocab = logprobs.shape[-1]
            total = (scores[:, None] + logprobs).flatten()
            top_scores, top_flat = total.topk(min(2 * num_beams, total.numel()))  # 多取一些，以防有的以 eos 结束
            rows, tokens, new_scores = [], [], []
            for score, flat in zip(top_scores.tolist(), top_flat.tolist()):
                row, token = divmod(flat, vocab)
                if token == eos_id:
                    finished.append((normalized(score, beams.shape[1] + 1), torch.cat([beams[row], idx.new_tensor([token])])))
                else:
                    rows.append(row)
                    tokens.append(token)
                    new_scores.append(score)
                if len(rows) == num_beams:
                    break
            if len(finished) >= num_beams or not rows:
                break
            beams = torch.cat([beams[rows], idx.new_tensor(tokens)[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=idx.device)
            if cache is not None:
                cache.reorder(rows)
        else:
            finished += [(normalized(s, beams.shape[1]), b) for s, b in zip(scores.tolist(), beams)]
    best_score, best = max(finished, key=lambda item: item[0])
    return (best[None, :], best_score) if return_score else best[None, :]
