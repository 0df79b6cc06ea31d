"""shared.kv_cache 的测试：带缓存与不带缓存的贪心 token 完全相同、logits 在容差内一致、缓存满报错、位置编号正确。"""
import pytest
import torch

from shared.kv_cache import KVCache, forward_cached, generate_cached, top_k_sampler
from shared.model import GPTModel, generate_text_simple, model_config

ATOL = 1e-5  # float32：SDPA 与手写 softmax 注意力的舍入差异在 1e-6 量级


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(model_config("tiny"), vocab_size=1000, context_length=48, **overrides)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "n_layers": 3, "n_heads": 4, "tie_weights": False}])
def test_greedy_tokens_identical_several_prompts(overrides):
    model = tiny_model(**overrides)
    ctx = model.cfg["context_length"]
    cache = KVCache.for_model(model, batch_size=2)  # 同一个缓存依次用于多个提示词（generate_cached 会先 reset）
    for seed, (T, n_new) in enumerate([(1, 20), (7, 30), (16, 33), (3, 1), (47, 2)]):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, model.cfg["vocab_size"], (2, T), generator=g)
        expected = generate_text_simple(model, idx, n_new, ctx)
        assert torch.equal(generate_cached(model, idx, n_new, cache=cache), expected)
        assert torch.equal(generate_cached(model, idx, n_new), expected)  # 自动建缓存


def test_logits_match_full_forward_in_chunks():
    model = tiny_model(qkv_bias=True)
    idx = torch.randint(0, 1000, (3, 40))
    cache = KVCache.for_model(model, batch_size=3)
    with torch.no_grad():
        full = model(idx)
        for _ in range(2):  # 第二轮验证 reset 之后结果不受旧内容影响
            cache.reset()
            # 预填充 10 个，再分别送入 15 个、1 个、14 个：覆盖“多个新 token + 非零起点”的掩码情形
            chunks = [forward_cached(model, idx[:, a:b], cache) for a, b in [(0, 10), (10, 25), (25, 26), (26, 40)]]
            assert cache.pos == 40
            assert torch.allclose(torch.cat(chunks, dim=1), full, atol=ATOL)


def test_stepwise_logits_match_uncached_last_position():
    model = tiny_model()
    idx = torch.randint(0, 1000, (1, 30))
    cache = KVCache.for_model(model)
    with torch.no_grad():
        forward_cached(model, idx[:, :5], cache)
        for t in range(5, 30):
            step = forward_cached(model, idx[:, t:t + 1], cache)[:, -1]
            assert torch.allclose(step, model(idx[:, :t + 1])[:, -1], atol=ATOL)


def test_position_ids_beyond_prompt():
    """第 t 个 token 必须用位置嵌入的第 t 行：把第 7 行之后的位置嵌入改掉，只影响位置 >= 7 的输出。"""
    model = tiny_model()
    idx = torch.randint(0, 1000, (1, 12))
    cache = KVCache.for_model(model)
    with torch.no_grad():
        forward_cached(model, idx[:, :4], cache)
        assert cache.pos == 4
        before = torch.cat([forward_cached(model, idx[:, t:t + 1], cache) for t in range(4, 12)], dim=1)
        model.pos_emb.weight[7:] = 5 * torch.randn_like(model.pos_emb.weight[7:])
        cache.reset()
        forward_cached(model, idx[:, :4], cache)
        after = torch.cat([forward_cached(model, idx[:, t:t + 1], cache) for t in range(4, 12)], dim=1)
        reference = model(idx)[:, 4:]
    assert torch.allclose(after, reference, atol=ATOL)
    assert torch.allclose(before[:, :3], after[:, :3], atol=ATOL)        # 位置 4、5、6 不变
    assert ((before[:, 3:] - after[:, 3:]).abs().amax(dim=-1) > 1e-3).all()  # 位置 7 起每个都改变


def test_cache_full_raises_clear_error():
    model = tiny_model()
    cache = KVCache.for_model(model, max_len=8)
    with torch.no_grad():
        forward_cached(model, torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(RuntimeError, match="KV 缓存已满"):
            forward_cached(model, torch.zeros(1, 3, dtype=torch.long), cache)
        assert cache.pos == 6  # 报错时不写入、不前进
        forward_cached(model, torch.zeros(1, 2, dtype=torch.long), cache)
        with pytest.raises(RuntimeError, match="KV 缓存已满"):
            forward_cached(model, torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(RuntimeError, match="KV 缓存已满"):
        generate_cached(model, torch.zeros(1, 5, dtype=torch.long), 5, cache=cache)  # 需要 9 个位置
    with pytest.raises(ValueError, match="超过 context_length"):
        generate_cached(model, torch.zeros(1, 40, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="max_len"):
        KVCache.for_model(model, max_len=model.cfg["context_length"] + 1)
    with pytest.raises(ValueError, match="批大小"):
        forward_cached(model, torch.zeros(2, 1, dtype=torch.long), KVCache.for_model(model, batch_size=1))


def test_fills_context_exactly():
    model = tiny_model()
    ctx = model.cfg["context_length"]
    idx = torch.randint(0, 1000, (1, 10))
    n_new = ctx - 10 + 1  # 最后一个新 token 不再送入模型，所以正好用满 context_length 个位置
    assert torch.equal(generate_cached(model, idx, n_new), generate_text_simple(model, idx, n_new, ctx))


def test_sampling_hook_is_reproducible_and_respects_top_k():
    model = tiny_model()
    idx = torch.randint(0, 1000, (1, 4))
    run = lambda: generate_cached(model, idx, 10, sample=top_k_sampler(0.8, top_k=1, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(run(), run())
    assert torch.equal(run(), generate_text_simple(model, idx, 10, 48))  # top_k=1 就是贪心
    with pytest.raises(ValueError):
        top_k_sampler(temperature=0)
