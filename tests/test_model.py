"""shared.model 的测试：参数量（公式、meta 设备、与 transformers 对照）、LayerNorm/GELU、前向与贪心生成。"""
import math

import pytest
import torch
import torch.nn as nn

from shared.gpt2_weights import export_gpt2_to_hf
from shared.model import (
    COURSE_CONFIGS, GELU, GPT_CONFIGS, FeedForward, GPTModel, LayerNorm, TransformerBlock, config_for_profile,
    generate_text_simple, model_config,
)

ALL_CONFIGS = [*GPT_CONFIGS, *COURSE_CONFIGS]


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # 共享权重只计一次


def formula(cfg):
    V, C, d, L = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    per_block = 12 * d * d + 10 * d + (3 * d if cfg["qkv_bias"] else 0)
    return V * d + C * d + L * per_block + 2 * d + (0 if cfg["tie_weights"] else V * d)


# 手算的精确参数量（共享权重，GPT-2 带 QKV 偏置；课程配置不带）
EXPECTED_TIED = {
    "gpt2-small (124M)": 124_439_808,
    "gpt2-medium (355M)": 354_823_168,
    "gpt2-large (774M)": 774_030_080,
    "gpt2-xl (1558M)": 1_557_611_200,
    "tiny": 3_320_256,
    "cpu": 11_476_032,
}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_param_count_matches_hand_count_and_formula(name):
    """在 meta 设备上建出每个预设（不占内存），参数量等于手算的精确值，也等于公式。"""
    cfg = model_config(name)
    with torch.device("meta"):
        tied, untied = GPTModel(cfg), GPTModel(dict(cfg, tie_weights=False))
    assert n_params(tied) == EXPECTED_TIED[name] == formula(cfg)
    assert n_params(untied) == EXPECTED_TIED[name] + cfg["vocab_size"] * cfg["emb_dim"]
    assert tied.out_head.weight is tied.tok_emb.weight
    assert untied.out_head.weight is not untied.tok_emb.weight


def test_gpt2_124m_untied_counts():
    cfg = model_config("gpt2-small (124M)")
    with torch.device("meta"):
        untied = GPTModel(dict(cfg, tie_weights=False))
        no_bias = GPTModel(dict(cfg, tie_weights=False, qkv_bias=False))
    assert n_params(untied) == 163_037_184
    assert n_params(no_bias) == 163_009_536  # 差 12 层 * 3 * 768 个偏置


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_formula_matches_instantiated_small_models(qkv_bias, tie):
    cfg = dict(model_config("tiny"), vocab_size=500, emb_dim=48, n_heads=3, n_layers=3, qkv_bias=qkv_bias, tie_weights=tie)
    assert n_params(GPTModel(cfg)) == formula(cfg)


def hf_model_for(cfg):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    )).eval()


def exported_to_hf(model, folder):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(export_gpt2_to_hf(model, folder)).eval()


SMALL_HF_CONFIGS = [
    dict(model_config("tiny"), vocab_size=2000, qkv_bias=True),
    dict(model_config("tiny"), vocab_size=1000, context_length=32, emb_dim=48, n_layers=3, n_heads=4, qkv_bias=True),
]


@pytest.mark.parametrize("cfg", SMALL_HF_CONFIGS)
def test_param_count_equals_transformers_gpt2(cfg):
    hf = hf_model_for(cfg)
    assert n_params(GPTModel(cfg)) == n_params(hf) == formula(cfg)


def test_logits_match_transformers_gpt2(tmp_path):
    cfg = SMALL_HF_CONFIGS[1]
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # 让偏置与 LayerNorm 参数非平凡，否则对不上的地方可能被 0/1 掩盖
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = exported_to_hf(model, tmp_path)
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()  # float32 容差 1e-4


def test_layernorm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32) * 5 + 3
    ours = LayerNorm(32)
    ref = nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.scale.copy_(torch.randn(32))
        ours.shift.copy_(torch.randn(32))
        ref.weight.copy_(ours.scale)
        ref.bias.copy_(ours.shift)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)  # float32 容差 1e-5
    y = LayerNorm(32)(x)
    assert torch.allclose(y.mean(-1), torch.zeros(4, 7), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(4, 7), atol=1e-3)  # eps 使方差略小于 1


def test_gelu_matches_torch_tanh_approximation():
    x = torch.linspace(-8, 8, 2001)
    assert torch.allclose(GELU()(x), nn.GELU(approximate="tanh")(x), atol=1e-6)  # float32 容差 1e-6
    assert (GELU()(x) - nn.GELU()(x)).abs().max() < 1e-3  # 与精确 erf 版只差近似误差


def test_block_and_feedforward_shapes():
    cfg = model_config("tiny")
    x = torch.randn(2, 5, cfg["emb_dim"])
    assert FeedForward(cfg)(x).shape == x.shape
    assert TransformerBlock(cfg)(x).shape == x.shape


def test_init_stats():
    torch.manual_seed(0)
    cfg = model_config("cpu")
    model = GPTModel(cfg)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 1e-3
    resid_std = 0.02 / math.sqrt(2 * cfg["n_layers"])
    assert abs(model.trf_blocks[0].att.out_proj.weight.std().item() - resid_std) < 1e-3
    assert abs(model.trf_blocks[0].ff.layers[2].weight.std().item() - resid_std) < 1e-3
    assert abs(model.trf_blocks[0].ff.layers[0].weight.std().item() - 0.02) < 1e-3
    assert torch.count_nonzero(model.trf_blocks[0].ff.layers[0].bias) == 0


def test_initial_loss_near_log_vocab():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=5000)
    model = GPTModel(cfg).eval()
    x = torch.randint(0, cfg["vocab_size"], (2, 32))
    y = torch.randint(0, cfg["vocab_size"], (2, 32))
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(cfg["vocab_size"])) < 0.1


def test_forward_rejects_too_long_input():
    cfg = model_config("tiny")
    model = GPTModel(cfg)
    with pytest.raises(ValueError, match="超过上下文长度"):
        model(torch.zeros(1, cfg["context_length"] + 1, dtype=torch.long))


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("t", [0, 5, 11])
def test_model_is_causal_changing_token_t_changes_only_positions_from_t(t, sdpa):
    """整个模型的因果性：改动第 t 个 token，t 之前的 logits 逐位相同（精确），t 及之后的每个位置都改变。"""
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), sdpa=sdpa)).eval()
    ids = torch.randint(0, 50257, (2, 12))
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 50257
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, :t], after[:, :t])
    assert (before[:, t:] != after[:, t:]).any(dim=-1).all()


def test_keep_computes_logits_only_where_asked():
    torch.manual_seed(0)
    model = GPTModel(model_config("tiny")).eval()
    x = torch.randint(0, 50257, (3, 10))
    keep = torch.rand(3, 10) > 0.6
    full = model(x)
    kept = model(x, keep=keep)
    assert kept.shape == (int(keep.sum()), 50257)
    torch.testing.assert_close(kept, full[keep], atol=1e-5, rtol=0)  # 同样的计算，只是少算了一些行


def test_generate_text_simple_equals_transformers_greedy(tmp_path):
    """第 4 章的贪心解码与 transformers 的 generate(do_sample=False) 在同一组权重上逐 token 相同。"""
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=1000, context_length=32)
    model = GPTModel(cfg).eval()
    hf = exported_to_hf(model, tmp_path)
    idx = torch.randint(0, cfg["vocab_size"], (2, 5))
    with torch.no_grad():
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate_text_simple(model, idx, 12, cfg["context_length"]), ref)


def test_generate_text_simple_crops_to_the_context():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=1000, context_length=16)
    model = GPTModel(cfg).eval()
    long = torch.randint(0, cfg["vocab_size"], (1, cfg["context_length"] + 10))
    out = generate_text_simple(model, long, 3, cfg["context_length"])
    assert out.shape == (1, cfg["context_length"] + 13) and torch.equal(out[:, :long.shape[1]], long)
    # 每个新 token 都只由最后 context_length 个 token 决定：逐步手算
    seq = long
    for _ in range(3):
        with torch.no_grad():
            logits = model(seq[:, -cfg["context_length"]:])[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_unknown_config_name_raises():
    with pytest.raises(ValueError, match="未知的模型配置"):
        model_config("gpt2-huge")


def test_config_is_a_copy_and_profiles():
    cfg = model_config("tiny")
    cfg["emb_dim"] = 1
    assert model_config("tiny")["emb_dim"] == 64
    assert config_for_profile("tiny") == model_config("tiny")
    assert config_for_profile("cpu") == model_config("cpu")
    assert config_for_profile("gpu") == model_config("gpt2-small (124M)")


def test_config_for_profile_reads_the_profile_at_call_time(monkeypatch):
    monkeypatch.setenv("LLM_PROFILE", "tiny")
    assert config_for_profile() == model_config("tiny")
    monkeypatch.setenv("LLM_PROFILE", "cpu")
    assert config_for_profile() == model_config("cpu")


def test_sdpa_config_gives_the_same_logits():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), qkv_bias=True)
    plain, fast = GPTModel(cfg).eval(), GPTModel(dict(cfg, sdpa=True)).eval()
    fast.load_state_dict(plain.state_dict())
    assert all(block.att.use_sdpa for block in fast.trf_blocks)
    x = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=0)  # float32，logits 约 ±1，容差 1e-4


def test_padded_vocab_never_changes_logits_loss_or_gradients():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=100, context_length=16)
    plain, padded = GPTModel(cfg), GPTModel(dict(cfg, pad_vocab_to=64))
    assert padded.tok_emb.weight.shape[0] == 128 and padded.out_head.weight is padded.tok_emb.weight
    with torch.no_grad():  # 补齐的 28 行填大数：若它们漏进 logits，softmax 会被它们主导
        state = plain.state_dict()
        state["tok_emb.weight"] = torch.cat([state["tok_emb.weight"], torch.full((28, cfg["emb_dim"]), 5.0)])
        state["out_head.weight"] = state["tok_emb.weight"]
        padded.load_state_dict(state)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    losses = []
    for model in (plain, padded):
        logits = model(x)
        assert logits.shape == (2, 16, 100)
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    grad_plain, grad_padded = plain.tok_emb.weight.grad, padded.tok_emb.weight.grad
    torch.testing.assert_close(grad_padded[:100], grad_plain, atol=1e-6, rtol=0)
    assert torch.count_nonzero(grad_padded[100:]) == 0  # 补齐的行既不进输入（没有这样的 id）也不进输出
    with torch.no_grad():
        torch.testing.assert_close(padded(x[:, :5], cache=padded.make_cache(2)), plain(x[:, :5]), atol=1e-5, rtol=0)
