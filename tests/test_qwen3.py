"""Qwen3（稠密与 MoE）：与 transformers 的小型随机 Qwen3ForCausalLM / Qwen3MoeForCausalLM 逐项对照。"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shared.generate import generate  # noqa: E402
from shared.qwen3 import (QWEN3_CONFIGS, MoEFeedForward, Qwen3Model, expert_load, hf_to_qwen3_name,  # noqa: E402
                          load_balancing_loss, load_qwen3, parameter_counts, preset_parameter_counts,
                          qwen3_config_from_hf)

ATOL = 1e-5  # float32，同一计算的不同实现
VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def hf_config(kind, norm_topk_prob=True):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, initializer_range=0.2)
    if kind == "dense":  # head_dim 16 != 32 / 4：检查 head_dim 与 emb_dim / n_heads 脱钩
        return transformers.Qwen3Config(**common, tie_word_embeddings=True)
    return transformers.Qwen3MoeConfig(**common, tie_word_embeddings=False, num_experts=6, num_experts_per_tok=2,
                                       moe_intermediate_size=24, norm_topk_prob=norm_topk_prob)


KINDS = {"dense": ("dense", True), "moe_norm": ("moe", True), "moe_no_norm": ("moe", False)}


@pytest.fixture(scope="module", params=list(KINDS))
def checkpoint(request, tmp_path_factory):
    """(HF 模型, 单文件目录, 分片目录)。"""
    kind, norm = KINDS[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, norm), attn_implementation="eager").eval()
    single, sharded = tmp_path_factory.mktemp(f"{request.param}_single"), tmp_path_factory.mktemp(f"{request.param}_sh")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    return model, single, sharded


def test_logits_match_transformers(checkpoint):
    hf_model, single, _ = checkpoint
    model, cfg = load_qwen3(single)
    assert cfg["qk_norm"] and cfg["head_dim"] == 16
    with torch.no_grad():
        diff = (model(IDS) - hf_model(IDS).logits).abs().max().item()
    assert diff < ATOL, f"logits 与 transformers 的最大绝对误差 {diff:.2e} 超过 atol={ATOL}"


def test_greedy_generation_matches_transformers(checkpoint):
    hf_model, single, _ = checkpoint
    model, _ = load_qwen3(single)
    ours = generate(model, IDS, 12)
    with torch.no_grad():
        ref = hf_model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref), "带 KV 缓存的贪心生成应与 transformers.generate(do_sample=False) 逐 token 相同"


def test_sharded_loading_equals_single_file(checkpoint):
    _, single, sharded = checkpoint
    a, _ = load_qwen3(single)
    b, _ = load_qwen3(sharded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if a.cfg["tie_embeddings"]:
        assert b.out_head.weight is b.tok_emb.weight


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("moe"), attn_implementation="eager")
    folder = tmp_path_factory.mktemp("moe_errors")
    model.save_pretrained(folder)
    return folder


def test_missing_tensor_names_it(moe_single, edited_checkpoint):
    folder = edited_checkpoint(moe_single, lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"trf_blocks\.1\.ff\.experts\.3\.fc2\.weight"):
        load_qwen3(folder)


def test_misshaped_tensor_names_it(moe_single, edited_checkpoint):
    def change(state):
        state["model.layers.0.mlp.gate.weight"] = torch.zeros(7, 32)
    folder = edited_checkpoint(moe_single, change)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate\.weight.*\(7, 32\).*\(6, 32\)"):
        load_qwen3(folder)


def test_fused_expert_format_is_rejected_clearly():
    with pytest.raises(ValueError, match="gate_up_proj"):
        hf_to_qwen3_name("model.layers.0.mlp.experts.gate_up_proj")


def test_config_from_hf_accepts_old_and_new_key_names():
    new = hf_config("moe").to_dict()
    assert "num_local_experts" in new and "rope_parameters" in new  # transformers 5 的写法
    old = {k: v for k, v in new.items() if k not in ("num_local_experts", "rope_parameters")}
    old.update(num_experts=6, rope_theta=1_000_000.0, rope_scaling=None)  # 真实 Qwen3 config.json 的写法
    assert qwen3_config_from_hf(new) == qwen3_config_from_hf(old)
    cfg = qwen3_config_from_hf(old)
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_hidden_dim"]) == (6, 2, 24)
    assert cfg["rope_base"] == 1_000_000.0 and cfg["qk_norm"]
    with pytest.raises(ValueError, match="model_type"):
        qwen3_config_from_hf(dict(new, model_type="llama"))


def _hf_config_for(cfg):
    kw = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["emb_dim"], intermediate_size=cfg["hidden_dim"],
              num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
              num_key_value_heads=cfg["n_kv_groups"], head_dim=cfg["head_dim"],
              max_position_embeddings=cfg["context_length"], rms_norm_eps=cfg["norm_eps"],
              tie_word_embeddings=cfg["tie_embeddings"],
              rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_base"]})
    if "num_experts" not in cfg:
        return transformers.Qwen3Config(**kw)
    return transformers.Qwen3MoeConfig(**kw, num_experts=cfg["num_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                                       moe_intermediate_size=cfg["moe_hidden_dim"], norm_topk_prob=cfg["norm_topk_prob"])


@pytest.mark.parametrize("name", list(QWEN3_CONFIGS))
def test_preset_parameter_counts_match_transformers(name):
    cfg = QWEN3_CONFIGS[name]
    hf = _hf_config_for(cfg)
    ours = preset_parameter_counts(cfg)  # 1 层与 2 层的模型外推（见下一个测试）
    with torch.device("meta"):  # transformers 的完整模型
        ref = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf).parameters())
    assert ours["total"] == ref
    assert {k: v for k, v in qwen3_config_from_hf(hf.to_dict()).items() if k != "dtype"} == \
        {k: v for k, v in cfg.items() if k != "dtype"}
    if name == "30B-A3B":  # 官方：30.5B 总参数、3.3B 激活
        assert 30.5e9 <= ours["total"] < 30.55e9 and 3.3e9 <= ours["active"] < 3.4e9
        assert ours["total"] - ours["active"] == 48 * (128 - 8) * 3 * 2048 * 768
    elif "num_experts" not in cfg:
        assert ours["active"] == ours["total"]


@pytest.mark.parametrize("name", ["0.6B", "8B", "30B-A3B"])
def test_layer_extrapolation_equals_full_model(name):
    cfg = dict(QWEN3_CONFIGS[name], n_layers=5)
    with torch.device("meta"):
        full = parameter_counts(Qwen3Model(cfg))
    assert preset_parameter_counts(cfg) == full
    sparse = dict(cfg, mlp_only_layers=[0]) if "num_experts" in cfg else None
    if sparse:  # 有稠密层时各层不同，退回到建整个模型
        with torch.device("meta"):
            assert preset_parameter_counts(sparse) == parameter_counts(Qwen3Model(sparse))


def test_moe_block_and_aux_loss_match_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config("moe", norm_topk_prob=False))
    block = hf_model.model.layers[0].mlp
    ours = MoEFeedForward(dict(emb_dim=32, num_experts=6, num_experts_per_tok=2, moe_hidden_dim=24,
                               norm_topk_prob=False))
    with torch.no_grad():
        ours.gate.weight.copy_(block.gate.weight)
        for j, expert in enumerate(ours.experts):
            gate_w, up_w = block.experts.gate_up_proj[j].chunk(2, dim=0)
            expert.fc1.weight.copy_(gate_w)
            expert.fc2.weight.copy_(up_w)
            expert.fc3.weight.copy_(block.experts.down_proj[j])
        x = torch.randn(3, 5, 32)
        diff = (ours(x) - block(x)).abs().max().item()
        hf_aux = load_balancing_loss_func((block.gate(x)[0],), num_experts=6, top_k=2)
    assert diff < ATOL, f"MoE 块输出的最大绝对误差 {diff:.2e} 超过 atol={ATOL}"
    assert ours.last_counts.sum().item() == 15 * 2
    # transformers 的 f_e 没有除以 top_k，所以它的值是我们的 top_k 倍
    assert abs(hf_aux.item() - 2 * ours.aux_loss.item()) < 1e-6


def test_expert_load_and_balancing_loss_on_a_model():
    cfg = qwen3_config_from_hf(hf_config("moe").to_dict())
    torch.manual_seed(0)
    model = Qwen3Model(dict(cfg, dtype=torch.float32)).train()
    load = expert_load(model, [IDS, IDS[:1]])
    assert load.shape == (2, 6) and (load.sum(dim=1) == 3 * 9 * 2).all()  # 每个 token 选 2 个专家
    assert model.training  # 统计时临时切到 eval，之后恢复
    model(IDS)
    loss = load_balancing_loss(model)  # 各 MoE 层 E * sum_e f_e P_e 的平均，可求导（经由 P_e）
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert model.trf_blocks[0].ff.gate.weight.grad is not None
