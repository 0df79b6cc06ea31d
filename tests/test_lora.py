import pytest
import torch

from shared.lora import (ATTENTION_TARGETS, MLP_TARGETS, LinearWithLoRA, LoRALayer, freeze_except_lora,
                         load_adapter, replace_linear_with_lora, save_adapter, set_merged)
from shared.model import GPTModel, model_config

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 合并前后的容差


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(model_config("tiny")).eval()


def tokens(seed=1):
    return torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(seed))


def lora_model(seed=0, rank=4, alpha=8, targets=ATTENTION_TARGETS + MLP_TARGETS):
    model = tiny_model(seed)
    replace_linear_with_lora(model, rank, alpha, targets)
    freeze_except_lora(model)
    return model


def train_a_few_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_output_unchanged_at_initialisation():
    base = tiny_model()
    with torch.no_grad():
        expected = base(tokens())
    model = lora_model()
    with torch.no_grad():
        assert torch.equal(model(tokens()), expected)  # B = 0：逐位相等


def test_merged_equals_unmerged_after_training_and_unmerge_restores():
    model = lora_model()
    train_a_few_steps(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(tokens())
        set_merged(model, True)
        merged = model(tokens())
        set_merged(model, False)
        again = model(tokens())
    assert not torch.allclose(unmerged, tiny_model()(tokens()), **TOL), "训练后输出应该改变"
    assert torch.allclose(merged, unmerged, **TOL)
    assert torch.allclose(again, unmerged, **TOL)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n


def test_only_lora_parameters_change_during_training():
    model = lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}
    train_a_few_steps(model)
    for n, p in model.named_parameters():
        if ".lora." in n:
            continue
        assert torch.equal(p, frozen[n]), f"{n} 不该改变"
    assert any(not torch.equal(m.lora.B, torch.zeros_like(m.lora.B))
               for m in model.modules() if isinstance(m, LinearWithLoRA))


def test_trainable_parameter_count():
    model = tiny_model()
    names = replace_linear_with_lora(model, rank=8, alpha=16)  # 只替换注意力
    trainable, total = freeze_except_lora(model)
    d = model.cfg["emb_dim"]
    assert len(names) == 4 * model.cfg["n_layers"]
    assert trainable == 4 * model.cfg["n_layers"] * (d * 8 + 8 * d)
    assert total == sum(p.numel() for p in tiny_model().parameters()) + trainable


def test_adapter_save_load_round_trip(tmp_path):
    model = lora_model()
    train_a_few_steps(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, metadata={"rank": 4})
    other = lora_model(seed=0)  # 相同底座，不同（初始）适配器
    load_adapter(other, path)
    with torch.no_grad():
        assert torch.equal(other(tokens()), model(tokens()))


def test_adapter_with_wrong_rank_is_rejected(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(lora_model(rank=4), path)
    with pytest.raises(ValueError, match=r"形状不符 \d+ 个：trf_blocks\.0\.att\.W_query\.lora\.A: 文件 \(64, 4\) / 模型 \(64, 2\)"):
        load_adapter(lora_model(rank=2), path)


def test_adapter_for_other_targets_is_rejected(tmp_path):
    """只改注意力的适配器装进“注意力 + 前馈”的模型：缺少前馈层的 A、B；反过来则多出它们。"""
    attn_only = tiny_model()
    replace_linear_with_lora(attn_only, rank=4, alpha=8)
    both = tiny_model()
    replace_linear_with_lora(both, rank=4, alpha=8, target_modules=ATTENTION_TARGETS + MLP_TARGETS)
    save_adapter(attn_only, tmp_path / "attn.safetensors")
    save_adapter(both, tmp_path / "both.safetensors")
    with pytest.raises(ValueError, match=r"缺少 \d+ 个：trf_blocks\.0\.ff\.layers\.0\.lora\.A"):
        load_adapter(both, tmp_path / "attn.safetensors")
    with pytest.raises(ValueError, match=r"多出 \d+ 个：trf_blocks\.0\.ff\.layers\.0\.lora\.A"):
        load_adapter(attn_only, tmp_path / "both.safetensors")


@pytest.mark.parametrize("rank", [0, -3])
def test_bad_rank_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        replace_linear_with_lora(tiny_model(), rank, 8)
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(4, 4, rank, 8)


def test_unknown_target_module_rejected():
    with pytest.raises(ValueError, match="没有匹配"):
        replace_linear_with_lora(tiny_model(), 4, 8, target_modules=("c_attn",))
