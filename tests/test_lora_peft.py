"""我们的 LoRA 与 Hugging Face peft 的 LoRA 等价：同一个随机小 GPT-2、同样的 A、B，logits 一致。

HF 的 GPT-2 用 Conv1D（权重形状 (输入, 输出)）且 c_attn 把 Q、K、V 拼成一个层；peft 在 c_attn 上只有一组
LoRA：lora_A.weight (r, d)、lora_B.weight (3d, r)。它等价于我们三个 LoRA 共用 A = lora_A.weight.T，
B 分别取 lora_B.weight.T 的三段列。c_proj 同时出现在注意力 (attn.c_proj -> out_proj) 与 MLP
(mlp.c_proj -> ff.layers.2) 中，两处都会被 target_modules=["c_proj"] 匹配到。
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 内部的弃用提示，与本测试无关

from shared.checkpoint import load_weights  # noqa: E402
from shared.gpt2_weights import convert_hf_gpt2_state, gpt2_config_from_hf  # noqa: E402
from shared.lora import (ATTENTION_TARGETS, MLP_TARGETS, LinearWithLoRA, freeze_except_lora,  # noqa: E402
                         replace_linear_with_lora, set_merged)
from shared.model import GPTModel  # noqa: E402

RANK, ALPHA, D = 4, 8, 32
TOL = dict(atol=1e-5, rtol=1e-5)  # float32：同一计算的两种实现，只差浮点舍入
IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny_hf_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=D, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # 偏置与 LayerNorm 也随机化，拆分/转置出错就能被发现
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from_hf(hf_model):
    cfg = gpt2_config_from_hf(hf_model.config.to_dict())
    model = GPTModel(cfg)
    load_weights(model, convert_hf_gpt2_state(hf_model.state_dict(), cfg))
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_gpt2()
    ours = ours_from_hf(hf)
    with torch.no_grad():  # 先确认底座本身一致
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, **TOL)

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True, lora_dropout=0.0)
    hf_lora = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():  # peft 的 B 初始为 0：随机化，让旁路真的起作用
        for name, p in hf_lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)

    replaced = replace_linear_with_lora(ours, RANK, ALPHA, ATTENTION_TARGETS + MLP_TARGETS)
    assert len(replaced) == 6 * 2
    copy_peft_into_ours(hf_lora, ours)
    return hf_lora, ours


def peft_ab(hf_lora, layer, module):
    m = hf_lora.base_model.model.transformer.h[layer].get_submodule(module)
    return m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()


@torch.no_grad()
def copy_peft_into_ours(hf_lora, ours):
    for i, block in enumerate(ours.trf_blocks):
        a, b = peft_ab(hf_lora, i, "attn.c_attn")  # a: (r, d)，b: (3d, r)
        for j, linear in enumerate((block.att.W_query, block.att.W_key, block.att.W_value)):
            linear.lora.A.copy_(a.T)
            linear.lora.B.copy_(b.T[:, j * D:(j + 1) * D])
        for module, linear in (("attn.c_proj", block.att.out_proj), ("mlp.c_fc", block.ff.layers[0]),
                               ("mlp.c_proj", block.ff.layers[2])):
            a, b = peft_ab(hf_lora, i, module)
            linear.lora.A.copy_(a.T)
            linear.lora.B.copy_(b.T)


def test_peft_config_matches_our_targets(pair):
    hf_lora, ours = pair
    n_peft = sum(p.numel() for n, p in hf_lora.named_parameters() if "lora_" in n)
    n_ours = sum(p.numel() for n, p in ours.named_parameters() if ".lora." in n)
    # c_attn 上 peft 只有一个 A（d×r），我们的 Q、K、V 各有一个：多出 2 个 d×r 每层
    assert n_ours == n_peft + 2 * 2 * D * RANK
    for module in ours.modules():
        if isinstance(module, LinearWithLoRA):
            assert module.lora.scaling == ALPHA / RANK


def test_logits_match_peft(pair):
    hf_lora, ours = pair
    with torch.no_grad():
        expected = hf_lora(input_ids=IDS).logits
        got = ours(IDS)
        with hf_lora.disable_adapter():
            without = hf_lora(input_ids=IDS).logits
    assert not torch.allclose(expected, without, atol=1e-3), "LoRA 旁路应该改变输出"
    torch.testing.assert_close(got, expected, **TOL)


def test_merged_logits_match_peft_merged(pair):
    hf_lora, ours = pair
    with torch.no_grad():
        expected = hf_lora(input_ids=IDS).logits
        set_merged(ours, True)
        merged = ours(IDS)
        set_merged(ours, False)
        hf_lora.merge_adapter()
        hf_merged = hf_lora(input_ids=IDS).logits
        hf_lora.unmerge_adapter()
    torch.testing.assert_close(merged, expected, **TOL)   # 合并前后输出相同（对照 peft 未合并的输出）
    torch.testing.assert_close(merged, hf_merged, **TOL)  # 我们合并后的模型 = peft 合并后的模型


def test_trainable_parameters_match_peft_per_layer(pair):
    hf_lora, ours = pair
    trainable, _ = freeze_except_lora(copy.deepcopy(ours))  # 在拷贝上冻结：不改动其他测试共用的夹具
    peft_trainable = sum(p.numel() for p in hf_lora.parameters() if p.requires_grad)
    assert trainable == peft_trainable + 2 * 2 * D * RANK
