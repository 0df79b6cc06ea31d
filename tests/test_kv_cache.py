"""shared.kv_cache：分块送入（带缓存）的 logits 与完整前向在容差内一致、位置编号正确、缓存满时报错且不改变状态、
束搜索用的 reorder。生成结果的逐 token 对比在 tests/test_generate.py。"""
import pytest
import torch

from shared.kv_cache import KVCache
from shared.model import GPTModel, model_config

ATOL = 1e-5  # float32：SDPA 与手写 softmax 注意力的舍入差异在 1e-6 量级


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(model_config("tiny"), vocab_size=1000, context_length=48, **overrides)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("overrides", [{"qkv_bias": True}, {"n_layers": 3, "n_heads": 4, "tie_weights": False}])
def test_logits_match_full_forward_in_chunks(overrides):
    model = tiny_model(**overrides)
    idx = torch.randint(0, 1000, (3, 40))
    cache = model.make_cache(batch_size=3)
    with torch.no_grad():
        full = model(idx)
        for _ in range(2):  # 第二轮验证 reset 之后结果不受旧内容影响
            cache.reset()
            # 预填充 10 个，再分别送入 15 个、1 个、14 个：覆盖“多个新 token + 非零起点”的掩码情形
            chunks = [model(idx[:, a:b], cache=cache) for a, b in [(0, 10), (10, 25), (25, 26), (26, 40)]]
            assert cache.pos == 40
            diff = (torch.cat(chunks, dim=1) - full).abs().max().item()
            assert diff <= ATOL, f"分块与完整前向的最大绝对误差 {diff:.1e} 超过 {ATOL}"


def test_stepwise_logits_match_uncached_last_position():
    model = tiny_model()
    idx = torch.randint(0, 1000, (1, 30))
    cache = model.make_cache()
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        for t in range(5, 30):
            step = model(idx[:, t:t + 1], cache=cache)[:, -1]
            assert torch.allclose(step, model(idx[:, :t + 1])[:, -1], atol=ATOL)


def test_position_ids_beyond_prompt():
    """第 t 个 token 必须用位置嵌入的第 t 行：把第 7 行之后的位置嵌入改掉，只影响位置 >= 7 的输出。"""
    model = tiny_model()
    idx = torch.randint(0, 1000, (1, 12))

    def stepwise():
        cache = model.make_cache()
        model(idx[:, :4], cache=cache)
        assert cache.pos == 4
        return torch.cat([model(idx[:, t:t + 1], cache=cache) for t in range(4, 12)], dim=1)

    with torch.no_grad():
        before = stepwise()
        model.pos_emb.weight[7:] = 5 * torch.randn_like(model.pos_emb.weight[7:])
        after = stepwise()
        reference = model(idx)[:, 4:]
    assert torch.allclose(after, reference, atol=ATOL)
    assert torch.allclose(before[:, :3], after[:, :3], atol=ATOL)        # 位置 4、5、6 不变
    assert ((before[:, 3:] - after[:, 3:]).abs().amax(dim=-1) > 1e-3).all()  # 位置 7 起每个都改变


def test_cache_full_raises_and_leaves_cache_unchanged():
    model = tiny_model()
    cache = model.make_cache(max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(RuntimeError, match=r"KV 缓存已满：已缓存 6 个 token，再写入 3 个"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        assert cache.pos == 6  # 报错时不写入、不前进
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(RuntimeError, match="KV 缓存已满"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"max_len=49 必须在 1 与 context_length=48 之间"):
        model.make_cache(max_len=49)
    with pytest.raises(ValueError, match="批大小 2 与缓存的批大小 1"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=model.make_cache(batch_size=1))


def test_cache_shape_and_dtype_follow_the_model():
    model = tiny_model(n_layers=3, n_heads=4)
    cache = model.make_cache(batch_size=2, max_len=10)
    assert cache.keys.shape == cache.values.shape == (3, 2, 4, 10, 16)
    assert cache.keys.dtype == model.tok_emb.weight.dtype and cache.max_len == 10
    assert model.make_cache().max_len == 48  # 默认就是 context_length


def test_reorder_selects_and_repeats_rows():
    cache = KVCache(n_layers=1, batch_size=3, n_heads=1, head_dim=2, max_len=4, context_length=4)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2)
    cache.update(0, k, -k)
    cache.pos = 2
    cache.reorder([2, 2, 0, 1])
    assert cache.batch_size == 4
    assert cache.keys[0, :, 0, :2, 0].tolist() == [[2.0, 2.0], [2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
    assert cache.values[0, :, 0, 0, 0].tolist() == [-2.0, -2.0, -0.0, -1.0]
    cache.check_room(4, 2)
    with pytest.raises(ValueError, match="批大小 3 与缓存的批大小 4"):
        cache.check_room(3, 1)
