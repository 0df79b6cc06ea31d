"""Gemma 3：与 transformers 的 Gemma3RMSNorm、掩码函数、Gemma3RotaryEmbedding、小型随机 Gemma3ForCausalLM 逐项对照；
环形 KV 缓存在超过窗口之后与不带缓存相同；不支持的配置明确报错。"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3 as hf_gemma3  # noqa: E402

from shared.gemma3 import (GEMMA3_CONFIGS, Gemma3Model, GemmaRMSNorm, SlidingWindowCache,  # noqa: E402
                           gemma3_config_from_hf, hf_to_gemma3_name, kv_cache_bytes, load_gemma3,
                           sliding_window_mask)
from shared.generate import generate  # noqa: E402
from shared.llama import compute_rope_params  # noqa: E402

ATOL = 1e-5  # float32，同一计算的不同实现
VOCAB, WINDOW = 128, 5
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}


def hf_config(**extra):
    """故意别扭的小配置：局部与全局层交错、窗口比序列短、1 个 KV 头、query_pre_attn_scalar (24) != head_dim (16)。"""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=WINDOW,
              query_pre_attn_scalar=24, layer_types=LAYER_TYPES, rope_parameters=ROPE, tie_word_embeddings=True)
    return transformers.Gemma3TextConfig(**(kw | extra))


def randomize(model, std, seed):
    """所有参数（包括归一化层的 w，默认是 0）都随机：w 与 1 + w 的混淆、名字对错都会在 logits 上看出来。"""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(HF 模型, 单文件目录, 分片目录)。"""
    model = randomize(transformers.AutoModelForCausalLM.from_config(hf_config(), attn_implementation="eager"),
                      std=0.1, seed=0)
    single, sharded = tmp_path_factory.mktemp("gemma_single"), tmp_path_factory.mktemp("gemma_sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    return model, single, sharded


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_rmsnorm_one_plus_weight_matches_transformers(dtype, atol):
    torch.manual_seed(0)
    ours, ref = GemmaRMSNorm(24), hf_gemma3.Gemma3RMSNorm(24, eps=1e-6)
    assert torch.equal(ours.weight, torch.zeros(24)), "Gemma 的 RMSNorm 权重初始化为 0（乘的是 1 + w）"
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = (torch.randn(3, 5, 24) * 4).to(dtype)
    diff = (ours(x).float() - ref(x).float()).abs().max().item()
    assert ours(x).dtype == dtype
    assert diff <= atol, f"{dtype}：与 Gemma3RMSNorm 的最大绝对误差 {diff:.2e} 超过 atol={atol}"


def reference_mask(fn, q_pos, k_pos):
    zero = torch.tensor(0)
    return fn(zero, zero, q_pos[:, None], k_pos[None, :]).expand(len(q_pos), len(k_pos))


@pytest.mark.parametrize("window", [None, 1, 3, 7])
@pytest.mark.parametrize("q_start, k_len", [(0, 12), (20, 23)])  # 训练时的方阵；带缓存时查询在后、键从 0 开始
def test_masks_match_transformers(window, q_start, k_len):
    q_pos, k_pos = torch.arange(q_start, k_len), torch.arange(k_len)
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    assert torch.equal(sliding_window_mask(q_pos, k_pos, window), reference_mask(fn, q_pos, k_pos))


def test_empty_cache_slots_are_never_visible():
    mask = sliding_window_mask(torch.tensor([2, 3]), torch.tensor([-1, 0, 1, 2, 3, -1]), window=3)
    assert mask.tolist() == [[False, True, True, True, False, False], [False, False, True, True, True, False]]


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_both_bases_match_transformers(layer_type):
    rotary = hf_gemma3.Gemma3RotaryEmbedding(hf_config())
    ref_cos, ref_sin = rotary(torch.zeros(1), torch.arange(64)[None], layer_type)
    cos, sin = compute_rope_params(16, ROPE[layer_type]["rope_theta"], context_length=64)
    diff = max((cos - ref_cos[0]).abs().max().item(), (sin - ref_sin[0]).abs().max().item())
    assert diff < 1e-6, f"{layer_type}：cos/sin 与 transformers 的最大绝对误差 {diff:.2e} 超过 1e-6"


def test_model_uses_the_right_base_per_layer(checkpoint):
    model, _ = load_gemma3(checkpoint[1])
    local = compute_rope_params(16, 10_000.0, 64)[0]
    assert torch.equal(model.cos_local, local) and not torch.equal(model.cos_global, local)


@pytest.mark.parametrize("layout", [1, 2])
def test_logits_match_transformers(checkpoint, layout):
    hf_model, folder = checkpoint[0], checkpoint[layout]
    model, cfg = load_gemma3(folder)
    assert cfg["layer_types"] == ["local", "global", "local", "local"] and cfg["query_pre_attn_scalar"] == 24
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 个 token，窗口 5
    with torch.no_grad():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < ATOL, f"logits 与 transformers 的最大绝对误差 {diff:.2e} 超过 atol={ATOL}"


def test_greedy_generation_beyond_the_window_matches_transformers(checkpoint):
    hf_model, _, sharded = checkpoint
    model, _ = load_gemma3(sharded)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))  # 提示词已经长于窗口
    ours = generate(model, prompt, 30)
    with torch.no_grad():
        ref = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert len(set(ours[:, 7:].flatten().tolist())) > 3, "随机模型只会重复同一个 token，比较就没有意义"
    assert torch.equal(ours, ref), "带环形 KV 缓存的贪心生成应与 transformers.generate(do_sample=False) 逐 token 相同"


def test_chunked_prefill_equals_full_forward(checkpoint):
    model, _ = load_gemma3(checkpoint[1])
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache, start = model.make_cache(batch_size=2), 0
        for size in [1, 7, 3, 12, 1, 1, 15]:  # 比窗口短和长的块都有
            part = model(ids[:, start:start + size], cache=cache)
            diff = (part - full[:, start:start + size]).abs().max().item()
            assert diff < ATOL, f"位置 {start}..{start + size - 1}：分块送入与完整前向的误差 {diff:.2e}"
            start += size


def test_local_layers_cache_only_the_window():
    model = Gemma3Model(dict(GEMMA3_CONFIGS["270M"], dtype=torch.float32, vocab_size=64, emb_dim=16, head_dim=8,
                             n_heads=2, hidden_dim=16, sliding_window=4, context_length=32))
    cache = model.make_cache(batch_size=3, max_len=30)
    assert isinstance(cache, SlidingWindowCache)
    assert tuple(cache.keys.shape) == (3, 3, 1, 30, 8)        # 18 层里 3 个全局层，每个存 30 个位置
    assert tuple(cache.ring_keys.shape) == (15, 3, 1, 4, 8)   # 15 个局部层，每个只存 4 个
    allocated = sum(t.numel() * t.element_size() for t in (cache.keys, cache.values, cache.ring_keys,
                                                           cache.ring_values))
    expected = 2 * 1 * 8 * 4 * (3 * 30 + 15 * 4) * 3  # K、V × n_kv × head_dim × 4 字节 × 位置数 × 批
    assert kv_cache_bytes(model.cfg, 30, batch_size=3, bytes_per_value=4) == allocated == expected


def test_270m_parameter_count_equals_transformers():
    with torch.device("meta"):
        ours = sum(p.numel() for p in Gemma3Model(GEMMA3_CONFIGS["270M"]).parameters())
        ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32_768))
    assert ours == sum(p.numel() for p in ref.parameters()) == 268_098_176


def test_norm_names_differ_from_llama():
    assert hf_to_gemma3_name("model.layers.3.post_attention_layernorm.weight") == "trf_blocks.3.post_att_norm.weight"
    assert hf_to_gemma3_name("model.layers.3.pre_feedforward_layernorm.weight") == "trf_blocks.3.norm2.weight"
    assert hf_to_gemma3_name("model.embed_tokens.weight") == "tok_emb.weight"


def test_config_from_hf_accepts_old_key_names():
    new = hf_config().to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None, sliding_window_pattern=2,
               num_hidden_layers=4)  # 旧写法：每第 2 层是全局层
    cfg = gemma3_config_from_hf(old)
    assert cfg["layer_types"] == ["local", "global", "local", "global"]
    assert (cfg["rope_base"], cfg["rope_local_base"]) == (1_000_000.0, 10_000.0)
    assert {k: v for k, v in cfg.items() if k != "layer_types"} == {
        k: v for k, v in gemma3_config_from_hf(new).items() if k != "layer_types"}


@pytest.mark.parametrize("change, match", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(model_type="gemma3"), "不是 Gemma 3 文本模型"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "不支持的层类型"),
    (dict(rope_parameters={**ROPE, "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
     "不支持的 RoPE 缩放"),
])
def test_unsupported_config_raises(change, match):
    with pytest.raises(ValueError, match=match):
        gemma3_config_from_hf(hf_config().to_dict() | change)


def test_bad_window_and_layer_types_raise(checkpoint):
    cfg = gemma3_config_from_hf(hf_config().to_dict())
    with pytest.raises(ValueError, match="sliding_window=65 必须在 1 与 context_length=64 之间"):
        Gemma3Model(dict(cfg, sliding_window=65))
    with pytest.raises(ValueError, match="layer_types 有 3 项，而 n_layers=4"):
        Gemma3Model(dict(cfg, layer_types=["local"] * 3))
    with pytest.raises(ValueError, match="只能是 'local' 或 'global'"):
        Gemma3Model(dict(cfg, layer_types=["local", "sliding", "local", "global"]))
    model, _ = load_gemma3(checkpoint[1])
    with pytest.raises(ValueError, match="超过上下文长度"):
        model(torch.zeros(1, 65, dtype=torch.long))
