"""shared.generate：课程里唯一的解码循环。贪心、温度、top-k、top-p、重复惩罚、逐行 EOS、束搜索，
带与不带 KV 缓存对 GPT、Llama、Qwen3（稠密与 MoE）、Gemma 3（滑动窗口）结果相同，采样服从 softmax 分布。"""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from shared.generate import (apply_repetition_penalty, beam_search, generate, sample_next, text_to_token_ids,
                             token_ids_to_text, top_k_filter, top_p_filter)
from shared.gemma3 import Gemma3Model
from shared.llama import Llama3Model
from shared.model import GPTModel, generate_text_simple, model_config
from shared.qwen3 import Qwen3Model
from shared.tokenizer import EOT_ID, get_gpt2_tokenizer

VOCAB = 97


def gpt(seed=0, context=24, **extra):
    torch.manual_seed(seed)
    return GPTModel(dict(model_config("tiny"), vocab_size=VOCAB, context_length=context, qkv_bias=True, **extra)).eval()


LLAMA = dict(vocab_size=VOCAB, context_length=24, emb_dim=32, n_heads=4, n_kv_groups=2, n_layers=2, hidden_dim=48,
             head_dim=None, rope_base=10_000.0, rope_freq=None, norm_eps=1e-5, qk_norm=False, tie_embeddings=True)


def llama_family(cls, seed=0, **extra):
    torch.manual_seed(seed)
    model = cls(dict(LLAMA, **extra)).eval()
    with torch.no_grad():  # 随机权重放大一些，让 logits 之间有明显差别
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


MODELS = {
    "gpt": gpt,
    "gpt-sdpa-padded": lambda: gpt(sdpa=True, pad_vocab_to=64),  # 提速开关：SDPA 路径 + 补齐的词表
    "llama": lambda: llama_family(Llama3Model),
    "qwen3": lambda: llama_family(Qwen3Model, qk_norm=True),
    "qwen3-moe": lambda: llama_family(Qwen3Model, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                                      moe_hidden_dim=16, norm_topk_prob=True),
    # 窗口 4 比提示词 + 生成的 18 个 token 短得多：局部层的环形缓存会被反复覆盖
    "gemma3": lambda: llama_family(Gemma3Model, head_dim=8, query_pre_attn_scalar=6, rope_local_base=10_000.0,
                                   sliding_window=4, layer_types=["local", "global"]),
}
SAMPLERS = {
    "greedy": {},
    "temperature": dict(temperature=1.3),
    "top-k": dict(temperature=0.9, top_k=5),
    "top-p": dict(temperature=1.0, top_p=0.8),
    "penalty": dict(temperature=0.7, repetition_penalty=1.5),
    "greedy+eos": dict(eos_id=7),
}
PROMPT = torch.tensor([[5, 17, 42], [8, 1, 60]])


class FixedLogits(nn.Module):
    """手工构造的“模型”：不管输入是什么，下一个 token 的 logits 都是同一张表。"""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1)


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
    assert ids.shape == (1, 5) and ids[0, -1].item() == EOT_ID
    assert token_ids_to_text(ids, tok) == "Hello, world!<|endoftext|>"
    with pytest.raises(ValueError, match="批大小为 2"):
        token_ids_to_text(torch.zeros(2, 3, dtype=torch.long), tok)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cached_and_uncached_generation_are_identical(model_name, sampler):
    model = MODELS[model_name]()
    kw = SAMPLERS[sampler]
    runs = [generate(model, PROMPT, 15, generator=torch.Generator().manual_seed(3), use_cache=use_cache, **kw)
            for use_cache in (True, False)]
    assert torch.equal(*runs), f"{model_name} / {sampler}：带缓存 {runs[0].tolist()} 与不带缓存 {runs[1].tolist()} 不同"


@pytest.mark.parametrize("model_name", MODELS)
def test_cache_is_really_used(model_name):
    """带缓存时：先把整个提示词送入一次（预填充），之后每步只送入 1 个新 token；不带缓存时每步送入整段序列。"""
    model = MODELS[model_name]()
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[1], kwargs.get("cache") is not None)), with_kwargs=True)
    generate(model, PROMPT, 5)
    assert calls == [(3, True)] + [(1, True)] * 4
    calls.clear()
    generate(model, PROMPT, 5, use_cache=False)
    assert calls == [(3 + i, False) for i in range(5)]


def test_greedy_equals_generate_text_simple_including_sliding_window():
    model = gpt(context=16)
    for prompt, n in [(PROMPT, 10), (PROMPT[:, :1], 30)]:  # 第二个超过上下文长度：缓存装不下，改用滑动窗口
        assert torch.equal(generate(model, prompt, n), generate_text_simple(model, prompt, n, 16))


@pytest.mark.parametrize("kw, expected", [
    (dict(temperature=1.0), torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]), dim=0)),
    (dict(temperature=0.5), torch.softmax(torch.tensor([4.0, 2.0, 1.0, 0.0, -2.0]), dim=0)),
    (dict(temperature=1.0, top_k=2), torch.tensor([math.e, 1.0, 0, 0, 0]) / (math.e + 1)),
    # 概率约为 0.53、0.20、0.12、0.07、0.03：累计达到 0.7 的最小集合是前两个
    (dict(temperature=1.0, top_p=0.7), torch.tensor([math.e, 1.0, 0, 0, 0]) / (math.e + 1)),
])
def test_samples_follow_the_filtered_softmax(kw, expected):
    """2 万次抽样的经验分布与理论分布的总变差距离 (total variation) < 0.02；悄悄退化成贪心的话距离约为 0.5。"""
    model = FixedLogits([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20_000
    out = generate(model, torch.zeros(n, 1, dtype=torch.long), 1, context_size=1,
                   generator=torch.Generator().manual_seed(0), **kw)
    freq = torch.bincount(out[:, 1], minlength=5).float() / n
    tv = 0.5 * (freq - expected).abs().sum().item()
    assert tv < 0.02, f"经验分布 {freq.tolist()} 与理论分布 {expected.tolist()} 的总变差距离 {tv:.3f}"
    assert freq[expected == 0].sum() == 0  # 被过滤掉的 token 一次也不出现


def test_sampling_depends_on_the_generator_seed():
    model = FixedLogits([0.0] * 10)  # 均匀分布：不同种子几乎不可能抽出相同的 20 个 token
    draw = lambda seed: generate(model, torch.zeros(1, 1, dtype=torch.long), 20, context_size=1, temperature=1.0,
                                 generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_low_temperature_and_top_k_one_equal_greedy():
    model = gpt()
    greedy = generate(model, PROMPT, 10)
    g = torch.Generator().manual_seed(0)
    # 温度 1e-4 时最大 logit 之外的概率小于 exp(-(差值)/1e-4)，可视为 0
    assert torch.equal(generate(model, PROMPT, 10, temperature=1e-4, generator=g), greedy)
    assert torch.equal(generate(model, PROMPT, 10, temperature=2.0, top_k=1, generator=g), greedy)


def test_sample_next_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 5.0]])
    assert sample_next(logits).tolist() == [[1], [2]]


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
    assert generate(model, start, 2, 4, repetition_penalty=10.0).tolist() == [[0, 1, 2]]


def test_eos_per_row():
    # 0 -> 2 -> 2（eos）；1 -> 0 -> 2：第一行第 1 步就结束，之后只补 eos；两行都结束后提前停止
    model = BigramTable([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    out = generate(model, torch.tensor([[0], [1]]), 10, 4, eos_id=2)
    assert out.tolist() == [[0, 2, 2], [1, 0, 2]]
    assert generate(model, torch.tensor([[1]]), 10, 4).shape == (1, 11)  # 不给 eos_id 就生成满 10 个


def test_generate_restores_training_mode_even_after_an_error():
    model = gpt().train()
    generate(model, PROMPT, 2)
    assert model.training
    with pytest.raises(IndexError, match="index out of range"):
        generate(model, torch.full((1, 2), VOCAB + 5), 2)  # 越界的 token id：嵌入层报错
    assert model.training


@pytest.mark.parametrize("model_name", MODELS)
def test_beam_search_same_with_and_without_cache(model_name):
    model = MODELS[model_name]()
    runs = [beam_search(model, PROMPT[:1], 8, num_beams=3, return_score=True, use_cache=c) for c in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == pytest.approx(runs[1][1], abs=1e-4)  # 得分是对数概率之和，缓存只引入 1e-6 量级的舍入差
    assert torch.equal(beam_search(model, PROMPT[:1], 8, num_beams=1), generate(model, PROMPT[:1], 8))


def test_beam_search_finds_better_sequence_than_greedy():
    # 从 0 出发：贪心先选 1 (0.58)，但 1 之后是均匀分布；走 2 (0.4) 之后几乎一定是 0 (0.9)
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


def test_beam_search_stops_at_eos():
    # 0 之后最可能是 eos=2，其次 1；1 之后必然是 eos
    model = BigramTable([[0.1, 0.3, 0.6], [0.05, 0.05, 0.9], [1 / 3, 1 / 3, 1 / 3]])
    beam = beam_search(model, torch.tensor([[0]]), 5, 4, num_beams=2, eos_id=2)
    assert beam.tolist() == [[0, 2]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(gpt(), PROMPT, **kwargs)


def test_bad_shapes_and_missing_context_raise():
    model = gpt()
    with pytest.raises(ValueError, match="idx 必须是形状"):
        generate(model, torch.tensor([1, 2, 3]), 3)
    with pytest.raises(ValueError, match="至少要有一个 token"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="context_size 必须是正整数"):
        generate(BigramTable([[0.5, 0.5]] * 2), torch.tensor([[0]]), 3)  # 没有 cfg 的模型要显式给出 context_size
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, PROMPT[:1], 3, num_beams=0)
    with pytest.raises(ValueError, match="批大小 2"):
        beam_search(model, PROMPT, 3, num_beams=2)


def test_on_token_sees_every_token_and_can_stop_early():
    model, prompt = gpt(), PROMPT[:1]
    seen = []
    full = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0),
                    on_token=lambda next_id: seen.append(next_id[0, 0].item()))
    assert seen == full[0, 3:].tolist(), "on_token 应按顺序收到每一个新 token"
    calls = []
    stopped = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0),
                       on_token=lambda next_id: calls.append(next_id) or len(calls) == 2)
    assert torch.equal(stopped, full[:, :5]), "on_token 返回真值时，生成在这个 token 之后停止"


def test_allowed_mask_restricts_every_step_and_rejects_an_empty_row():
    model, idx = gpt(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    even = torch.zeros(VOCAB, dtype=torch.bool)
    even[::2] = True
    calls = []

    def allowed(seq):
        calls.append(seq.shape[1])
        return even.expand(seq.shape[0], -1)

    out = generate(model, idx, 6, temperature=1.0, generator=torch.Generator().manual_seed(0), allowed=allowed)
    assert calls == [3, 4, 5, 6, 7, 8]  # 每一步看到的是到这一步为止的整个序列
    assert (out[:, 3:] % 2 == 0).all()
    with torch.no_grad():  # 贪心 + 掩码 = 在允许的 token 里取 logit 最大的
        logits = model(idx)[:, -1].masked_fill(~even, float("-inf"))
    assert torch.equal(generate(model, idx, 1, allowed=allowed)[:, -1], logits.argmax(-1))
    with pytest.raises(ValueError, match="每行至少要允许一个 token"):
        generate(model, idx, 2, allowed=lambda seq: torch.zeros(seq.shape[0], VOCAB, dtype=torch.bool))
