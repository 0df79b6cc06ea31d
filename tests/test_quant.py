"""shared.quant：逐输出通道对称 int8 量化、Int8Linear（融合内核与参考实现）、quantize_model。

误差界：每个权重 |w - s·q| ≤ s/2（s 是它那一行的 scale）；因此每个输出 |y_j - ŷ_j| ≤ (s_j/2)·Σ_i |x_i|（float32 计算时）。
"""
import copy

import pytest
import torch
import torch.nn as nn

from shared.generate import generate
from shared.model import GPTModel, model_config
from shared.quant import Int8Linear, quantize_int8, quantize_model


def test_quantize_int8_error_bound_and_range():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 0, 64)[:, None]  # 各行尺度相差 1000 倍
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and s.shape == (64,)
    assert ((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 + 1e-9).all()
    assert (q.abs().amax(dim=1) == 127).all()  # 每一行的最大值都映射到 ±127：逐行的 scale


def test_int8_linear_float32_obeys_the_bound():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(5, 96)
    layer = Int8Linear(linear, torch.float32)  # float32：走参考实现，误差只来自量化
    with torch.no_grad():
        err = (layer(x) - linear(x)).abs()
    _, s = quantize_int8(linear.weight.detach())
    bound = (s / 2)[None, :] * x.abs().sum(dim=1, keepdim=True)
    assert (err <= bound + 1e-5).all()
    assert err.max() > 0  # 真的量化了


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="这个 torch 没有 int8 融合内核")
def test_fused_kernel_equals_reference_path():
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(64, 256), torch.bfloat16)
    x = torch.randn(3, 7, 64).bfloat16()
    with torch.no_grad():
        fused = layer(x)
        reference = (nn.functional.linear(x.float(), layer.weight_int8.float()) * layer.scale.float()
                     + layer.bias.float())
    torch.testing.assert_close(fused.float(), reference, atol=0.05, rtol=0.02)  # bf16 输出，约 2-3 位有效数字


def test_quantize_model_replaces_every_linear_and_still_generates():
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), qkv_bias=True)).eval()
    quant = quantize_model(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in quant.modules())
    assert sum(isinstance(m, Int8Linear) for m in quant.modules()) == 6 * 2 + 1
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        exact, approx = model(x), quant(x).float()
    assert ((approx - exact).norm() / exact.norm()) < 0.05  # int8 权重 + bf16 激活：相对误差约 1%
    prompt = x[:, :4]
    assert torch.equal(generate(quant, prompt, 6), generate(quant, prompt, 6, use_cache=False))

