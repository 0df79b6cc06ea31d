"""第 5 章的解码策略：贪心、温度、top-k、top-p、重复惩罚与束搜索。"""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from shared.generate import (apply_repetition_penalty, beam_search, generate, text_to_token_ids,
                             token_ids_to_text, top_k_filter, top_p_filter)
from shared.model import GPTModel, generate_text_simple, model_config
from shared.tokenizer import get_gpt2_tokenizer


def small_model(seed=0, vocab=97):
    torch.manual_seed(seed)
    cfg = dict(model_config("tiny"), vocab_size=vocab, context_length=16)
    return GPTModel(cfg).eval()


PROMPT = torch.tensor([[5, 17, 42]])


class BigramTable(nn.Module):
    """手工构造的“模型”：下一个 token 的对数概率只取决于上一个 token。"""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logp", torch.log(torch.tensor(probs)))

    def forward(self, idx):
        return self.logp[idx]


def test_text_round_trip():
    tok = get_gpt2_tokenizer()
    ids = text_to_token_ids("Hello, world!<|endoftext|>", tok)
    assert ids.shape == (1, 5) and ids[0, -1].item() == 50256
    assert token_ids_to_text(ids, tok) == "Hello, world!<|endoftext|>"
    with pytest.raises(ValueError, match="批大小"):
        token_ids_to_text(torch.zeros(2, 3, dtype=torch.long), tok)


def test_greedy_matches_generate_text_simple():
    model = small_model()
    expected = generate_text_simple(model, PROMPT, 10, 16)
    assert torch.equal(generate(model, PROMPT, 10, 16), expected)


def test_low_temperature_equals_greedy():
    model = small_model()
    greedy = generate(model, PROMPT, 10, 16)
    g = torch.Generator().manual_seed(0)
    # 温度 1e-4 时最大 logit 之外的概率小于 exp(-(差值)/1e-4)，可视为 0
    assert torch.equal(generate(model, PROMPT, 10, 16, temperature=1e-4, generator=g), greedy)


def test_top_k_one_equals_greedy():
    model = small_model()
    g = torch.Generator().manual_seed(1)
    sampled = generate(model, PROMPT, 10, 16, temperature=2.0, top_k=1, generator=g)
    assert torch.equal(sampled, generate(model, PROMPT, 10, 16))


def test_sampling_is_reproducible_with_a_generator():
    model = small_model()
    runs = [generate(model, PROMPT, 12, 16, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.equal(kept[torch.isfinite(kept)], torch.tensor([5.0, 4.0]))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.69, 0.71, 0.9, 0.99])
def test_top_p_keeps_smallest_set_reaching_p(p):
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    kept = torch.isfinite(top_p_filter(probs.log()[None], p))[0]
    # 暴力求解：所有累计概率 >= p 的子集中最小的那个（概率互不相同，所以唯一）
    subsets = [set(s) for r in range(1, 6) for s in itertools.combinations(range(5), r) if probs[list(s)].sum() >= p]
    smallest = min(subsets, key=lambda s: (len(s), -probs[list(s)].sum()))
    assert set(torch.nonzero(kept).flatten().tolist()) == smallest


def test_top_p_filtered_distribution_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(top_p_filter(logits, 0.8), dim=-1)
    full = torch.softmax(logits, dim=-1)
    # 0.644 + 0.237 >= 0.8：只剩前两个 token，按它们的概率重新归一化
    assert probs[0, 2:].tolist() == [0.0, 0.0]
    assert torch.allclose(probs[0, :2], full[0, :2] / full[0, :2].sum(), atol=1e-6)


def test_repetition_penalty_as_documented():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 1]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    # 出现过的 token 0（正 logit）除以 2，token 1（负 logit）乘以 2；其余不变
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_changes_greedy_choice():
    # 从任何 token 出发都最偏爱 token 0；惩罚之后就不再重复 0
    model = BigramTable([[0.6, 0.3, 0.1]] * 3)
    start = torch.tensor([[0]])
    assert generate(model, start, 2, 4).tolist() == [[0, 0, 0]]
    assert generate(model, start, 2, 4, repetition_penalty=10.0).tolist()[0][1] != 0


def test_eos_stops_generation():
    model = BigramTable([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    out = generate(model, torch.tensor([[0]]), 10, 4, eos_id=2)
    assert out.tolist() == [[0, 2]]


def test_beam_search_with_one_beam_equals_greedy():
    model = small_model()
    assert torch.equal(beam_search(model, PROMPT, 8, 16, num_beams=1), generate(model, PROMPT, 8, 16))


def test_beam_search_finds_better_sequence_than_greedy():
    # 从 0 出发：贪心先选 1 (0.6)，但 1 之后是均匀分布；走 2 (0.4) 之后几乎一定是 0 (0.9)
    probs = [[0.02, 0.58, 0.40], [1 / 3, 1 / 3, 1 / 3], [0.90, 0.05, 0.05]]
    model = BigramTable(probs)
    start = torch.tensor([[0]])

    def logprob(seq):
        return sum(math.log(probs[a][b]) for a, b in zip(seq, seq[1:]))

    greedy = generate(model, start, 2, 4)[0].tolist()
    beam, score = beam_search(model, start, 2, 4, num_beams=2, return_score=True)
    best = max(([0, a, b] for a in range(3) for b in range(3)), key=logprob)  # 穷举
    assert beam[0].tolist() == best == [0, 2, 0]
    assert greedy != best and logprob(greedy) < logprob(best)
    assert score == pytest.approx(logprob(best) / 2, abs=1e-6)  # length_penalty=1：按新 token 数平均


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(small_model(), PROMPT, 3, 16, **kwargs)


def test_bad_shapes_raise():
    model = small_model()
    with pytest.raises(ValueError, match="idx"):
        generate(model, torch.tensor([1, 2, 3]), 3, 16)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, PROMPT, 3, 16, num_beams=0)
    with pytest.raises(ValueError, match="批大小"):
        beam_search(model, PROMPT.repeat(2, 1), 3, 16, num_beams=2)
