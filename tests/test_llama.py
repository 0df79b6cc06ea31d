"""Llama3Model 与 transformers 的 LlamaForCausalLM 逐项核对：RMSNorm、RoPE、GQA、整模型 logits 与贪心生成。"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from shared.attention import MultiHeadAttention  # noqa: E402
from shared.generate import generate  # noqa: E402
from shared.llama import (  # noqa: E402
    LLAMA32_CONFIGS,
    GroupedQueryAttention,
    Llama3Model,
    RMSNorm,
    apply_rope,
    compute_rope_params,
    llama_config_from_hf,
    load_llama,
)

ATOL = 1e-5  # float32，同一计算的不同实现（注意力的求和顺序不同）
SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=16)


def hf_rope_parameters(scaled):
    rope = dict(rope_type="default", rope_theta=500_000.0)
    if scaled:
        rope.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
    return rope


def make_hf_llama(tie, seed=0):
    """小的随机 LlamaForCausalLM：GQA（4 个查询头、2 组 K/V），Llama 3 的 RoPE 缩放，eager 注意力，float32。"""
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters=hf_rope_parameters(scaled=True), bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # 归一化权重默认全是 1；随机化后名字对应错了才能被发现
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    hf_model = make_hf_llama(tie=request.param)
    folder = tmp_path_factory.mktemp("llama_tied" if request.param else "llama_untied")
    hf_model.save_pretrained(folder)
    model, cfg = load_llama(folder)
    return hf_model, model, cfg


IDS = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(1))


def test_config_from_checkpoint(checkpoint):
    hf_model, model, cfg = checkpoint
    assert cfg["n_kv_groups"] == 2 < cfg["n_heads"] == 4
    assert cfg["rope_freq"] == SCALING
    assert cfg["tie_embeddings"] == hf_model.config.tie_word_embeddings
    tied = model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert tied == cfg["tie_embeddings"]


def test_logits_match_transformers(checkpoint):
    hf_model, model, _ = checkpoint
    with torch.no_grad():
        ours, ref = model(IDS), hf_model(IDS).logits
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"logits 与 transformers 的最大绝对误差 {diff:.2e} 超过 atol={ATOL}"


def test_greedy_generation_matches_hf_generate(checkpoint):
    hf_model, model, _ = checkpoint
    prompt = IDS[:1, :7]
    with torch.no_grad():
        ref = hf_model.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None,
                                attention_mask=torch.ones_like(prompt))
    ours = generate(model, prompt, 25)
    assert torch.equal(ours, ref), f"贪心生成与 transformers 不同：{ours.tolist()} vs {ref.tolist()}"


def test_generation_stops_at_eos_like_hf(checkpoint):
    hf_model, model, _ = checkpoint
    prompt = IDS[:1, :7]
    eos = int(generate(model, prompt, 4)[0, -1])  # 第 4 个生成的 token 当作结束符
    with torch.no_grad():
        ref = hf_model.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=eos,
                                attention_mask=torch.ones_like(prompt))
    ours = generate(model, prompt, 25, eos_id=eos)
    assert torch.equal(ours, ref)
    assert int(ours[0, -1]) == eos and ours.shape[1] <= 7 + 4


def test_cached_forward_equals_uncached(checkpoint):
    _, model, _ = checkpoint
    cache = model.make_cache(batch_size=2)
    with torch.no_grad():
        full = model(IDS)
        parts = [model(IDS[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 19), (19, 30)]]
    assert cache.pos == 30
    diff = (torch.cat(parts, dim=1) - full).abs().max().item()
    assert diff <= ATOL, f"分块（带缓存）与完整前向的最大绝对误差 {diff:.2e} 超过 atol={ATOL}"


def test_context_overflow_raises(checkpoint):
    _, model, cfg = checkpoint
    n = cfg["context_length"]
    with pytest.raises(ValueError, match="context_length=64"):
        model(torch.zeros(1, n + 1, dtype=torch.long))
    cache = model.make_cache(batch_size=1)
    with torch.no_grad():
        model(torch.zeros(1, n - 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="缓存中 62 个"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    # 提示词 + 生成超过上下文长度时，generate 不用缓存，改用滑动窗口（仍然不越界）
    long = generate(model, IDS[:1, :10], max_new_tokens=n)
    assert long.shape == (1, 10 + n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = (torch.randn(3, 5, 48) * 4 + 2).to(dtype)
    with torch.no_grad():
        a, b = ours.to(dtype)(x), ref.to(dtype)(x)
    assert a.dtype == dtype
    assert torch.equal(a, b), "RMSNorm 应与 LlamaRMSNorm 逐位相同（同样的运算顺序）"


@pytest.mark.parametrize("scaled", [False, True], ids=["default", "llama3"])
def test_rope_matches_hf(scaled):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 20, 16), torch.randn(2, 2, 20, 16)
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                                      rope_parameters=hf_rope_parameters(scaled))
    positions = torch.arange(30, 50)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions)
    hf_q, _ = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    hf_k, _ = apply_rotary_pos_emb(k, k, hf_cos, hf_sin)
    cos, sin = compute_rope_params(16, 500_000.0, 64, SCALING if scaled else None)
    assert cos.shape == sin.shape == (64, 16)
    torch.testing.assert_close(cos[30:50], hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[30:50], hf_sin[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(q, cos, sin, offset=30), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin, offset=30), hf_k, atol=1e-6, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = compute_rope_params(32, 10_000.0, 512)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m, n):
        return (apply_rope(q, cos, sin, m) * apply_rope(k, cos, sin, n)).sum()

    base = score(7, 2)
    for m in (12, 100, 500):
        torch.testing.assert_close(score(m, m - 5), base, atol=1e-4, rtol=0)  # float32 的角度误差随位置增长
    assert (score(8, 2) - base).abs() > 1e-2


def test_gqa_with_one_head_per_group_equals_mha():
    torch.manual_seed(0)
    d, heads, T = 32, 4, 9
    gqa = GroupedQueryAttention(d, heads, num_kv_groups=heads)
    mha = MultiHeadAttention(d, d, context_length=T, dropout=0.0, num_heads=heads)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value", "out_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        mha.out_proj.bias.zero_()
        x = torch.randn(2, T, d)
        identity = torch.ones(T, d // heads), torch.zeros(T, d // heads)  # cos=1, sin=0：不旋转
        diff = (gqa(x, *identity) - mha(x)).abs().max().item()
    assert diff <= 1e-6, f"GQA (n_kv_groups == n_heads) 与 MHA 的最大绝对误差 {diff:.2e} 超过 1e-6"


def test_gqa_rejects_bad_groups():
    with pytest.raises(ValueError, match="num_kv_groups"):
        GroupedQueryAttention(32, 4, num_kv_groups=3)


# Meta 发布的 config.json（旧格式：rope_theta + rope_scaling），只保留与结构有关的字段
META_CONFIGS = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
}
META_COMMON = dict(
    vocab_size=128256, max_position_embeddings=131072, num_key_value_heads=8, rms_norm_eps=1e-05,
    rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8192,
                      rope_type="llama3"),
)
OFFICIAL_COUNTS = {"1B": 1_235_814_400, "3B": 3_212_749_824}  # 也用 transformers 在 meta 设备上数过


@pytest.mark.parametrize("name", ["1B", "3B"])
def test_llama32_configs_and_parameter_counts(name):
    parsed = llama_config_from_hf(dict(META_COMMON, **META_CONFIGS[name]))
    assert {k: v for k, v in parsed.items() if k != "dtype"} == \
        {k: v for k, v in LLAMA32_CONFIGS[name].items() if k != "dtype"}
    with torch.device("meta"):
        model = Llama3Model(LLAMA32_CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name]
    assert model.tok_emb.weight.dtype == torch.bfloat16
