"""shared.attention.MultiHeadAttention 与 tiled_attention 的等价性与接口测试。

参照实现：F.scaled_dot_product_attention(is_causal=True) 与 nn.MultiheadAttention（复制同一组权重）。
容差：float64 用 atol=1e-10，float32 用 atol=1e-5（输入为标准正态、层宽几十，舍入误差约 1e-7）。
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.attention import MultiHeadAttention, tiled_attention

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_mha(d_in=16, d_out=24, context_length=20, num_heads=4, qkv_bias=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=qkv_bias).eval()
    if qkv_bias:  # 默认偏置有可能很小，随机化一下，确保偏置确实参与了比较
        with torch.no_grad():
            for lin in (mha.W_query, mha.W_key, mha.W_value):
                lin.bias.normal_()
    return mha


def split_heads(t, num_heads):
    b, T, d = t.shape
    return t.view(b, T, num_heads, d // num_heads).transpose(1, 2)


def reference_sdpa(mha, x):
    """同样的投影，注意力部分交给 PyTorch 的 F.scaled_dot_product_attention。"""
    b, T, _ = x.shape
    q, k, v = (split_heads(lin(x), mha.num_heads) for lin in (mha.W_query, mha.W_key, mha.W_value))
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return mha.out_proj(context.transpose(1, 2).reshape(b, T, mha.d_out))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matches_scaled_dot_product_attention(dtype, qkv_bias):
    mha = make_mha(qkv_bias=qkv_bias).to(dtype)
    x = torch.randn(2, 13, 16, dtype=dtype)
    with torch.no_grad():
        ours, ref = mha(x), reference_sdpa(mha, x)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matches_nn_multihead_attention(dtype, qkv_bias):
    d, heads, T = 24, 4, 11
    mha = make_mha(d_in=d, d_out=d, num_heads=heads, qkv_bias=qkv_bias).to(dtype)
    # nn.MultiheadAttention 的 bias=True 同时给输入投影和 out_proj 加偏置；我们的 out_proj 总有偏置，
    # 所以 qkv_bias=False 时把它的输入投影偏置置 0。
    torch_mha = nn.MultiheadAttention(d, heads, dropout=0.0, bias=True, batch_first=True, dtype=dtype).eval()
    with torch.no_grad():
        torch_mha.in_proj_weight.copy_(torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight]))
        if qkv_bias:
            torch_mha.in_proj_bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        else:
            torch_mha.in_proj_bias.zero_()
        torch_mha.out_proj.weight.copy_(mha.out_proj.weight)
        torch_mha.out_proj.bias.copy_(mha.out_proj.bias)

        x = torch.randn(3, T, d, dtype=dtype)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = 不允许注意
        ref, _ = torch_mha(x, x, x, attn_mask=causal, need_weights=False)
        ours = mha(x)
    torch.testing.assert_close(ours, ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "b, T, d_in, d_out, num_heads, context_length",
    [(3, 7, 5, 6, 3, 10), (1, 1, 3, 4, 2, 8), (2, 9, 7, 9, 1, 9), (4, 5, 2, 10, 5, 32)],
)
def test_shapes_for_odd_sizes(b, T, d_in, d_out, num_heads, context_length):
    mha = MultiHeadAttention(d_in, d_out, context_length, 0.0, num_heads)
    out = mha(torch.randn(b, T, d_in))
    assert out.shape == (b, T, d_out)
    assert mha.head_dim * mha.num_heads == mha.d_out == d_out
    assert mha.mask.shape == (context_length, context_length)
    with torch.no_grad():  # T < context_length 时用的是掩码左上角，结果仍与 SDPA 一致（float32，atol=1e-5）
        x = torch.randn(b, T, d_in)
        torch.testing.assert_close(mha(x), reference_sdpa(mha, x), atol=1e-5, rtol=0)


def test_d_out_not_divisible_by_heads_raises_clear_error():
    with pytest.raises(ValueError, match=r"d_out \(10\).*num_heads \(3\)"):
        MultiHeadAttention(d_in=8, d_out=10, context_length=4, dropout=0.0, num_heads=3)


def test_input_longer_than_context_length_is_rejected():
    mha = MultiHeadAttention(4, 4, context_length=5, dropout=0.0, num_heads=2)
    with pytest.raises(ValueError, match=r"输入长度 6 超过 context_length=5"):
        mha(torch.randn(1, 6, 4))
    assert mha(torch.randn(1, 5, 4)).shape == (1, 5, 4)


def test_is_causal_future_tokens_do_not_change_past_outputs():
    mha = make_mha()
    x = torch.randn(2, 10, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 16) * 10
    with torch.no_grad():
        a, b = mha(x), mha(changed)
    assert torch.equal(a[:, :6], b[:, :6])  # 精确相等：前 6 个位置根本看不到后面
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_mask_buffer_follows_to_and_is_not_in_state_dict():
    mha = make_mha(qkv_bias=True)
    assert "mask" in dict(mha.named_buffers())
    assert all("mask" not in key for key in mha.state_dict())
    assert mha.mask.dtype == torch.bool

    # .to(dtype)：参数变成 float64，布尔掩码保持 bool，前向仍可运行
    mha64 = mha.to(torch.float64)
    assert mha64.W_query.weight.dtype == torch.float64
    assert mha64.mask.dtype == torch.bool
    assert mha64(torch.randn(1, 5, 16, dtype=torch.float64)).dtype == torch.float64

    # .to(device)：用不分配内存的 meta 设备代替 GPU，掩码和参数一起"搬家"
    on_meta = make_mha().to("meta")
    assert on_meta.mask.device.type == "meta"
    assert on_meta.W_query.weight.device.type == "meta"
    assert on_meta(torch.randn(1, 5, 16, device="meta")).device.type == "meta"

    # 不含掩码的 state_dict 可以严格加载进新模块，输出一致
    fresh = MultiHeadAttention(16, 24, 20, 0.0, 4, qkv_bias=True).to(torch.float64).eval()
    fresh.load_state_dict(mha64.state_dict(), strict=True)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert torch.equal(fresh(x), mha64(x))


def test_dropout_only_in_training_mode():
    mha = make_mha(dropout=0.5)
    x = torch.randn(2, 8, 16)
    mha.eval()
    with torch.no_grad():
        assert torch.equal(mha(x), mha(x))
        torch.testing.assert_close(mha(x), reference_sdpa(mha, x), atol=1e-5, rtol=0)
        mha.train()
        torch.manual_seed(1)
        first = mha(x)
        torch.manual_seed(2)
        assert not torch.allclose(first, mha(x))


def sdpa_twin(mha):
    """与 mha 同一组权重、只把注意力换成 SDPA 路径（use_sdpa=True）的模块。"""
    twin = MultiHeadAttention(mha.W_query.in_features, mha.d_out, mha.mask.shape[0], mha.dropout.p, mha.num_heads,
                              qkv_bias=mha.W_query.bias is not None, use_sdpa=True).to(mha.W_query.weight.dtype)
    twin.load_state_dict(mha.state_dict())
    return twin.train(mha.training)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sdpa_path_equals_explicit_path_in_eval(dtype, dropout):
    mha = make_mha(qkv_bias=True, dropout=dropout).to(dtype)  # eval 模式：dropout 不生效，两条路径应逐元素一致
    x = torch.randn(2, 13, 16, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(sdpa_twin(mha)(x), mha(x), atol=ATOL[dtype], rtol=0)


def test_sdpa_path_has_the_same_gradients_in_training_mode():
    mha = make_mha(qkv_bias=True).to(torch.float64).train()  # dropout=0：训练模式下也没有随机性
    fast = sdpa_twin(mha)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    mha(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (name, p), q in zip(mha.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=0, msg=name)  # float64，容差 1e-10


def test_sdpa_path_applies_dropout_only_in_training():
    fast = sdpa_twin(make_mha(dropout=0.5))
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        calm = fast(x)
        fast.train()
        torch.manual_seed(1)
        noisy = fast(x)
    assert not torch.allclose(calm, noisy)  # 训练模式下 dropout_p=0.5 真的传给了 SDPA


# (T, block_size)：整除、不整除、只有一个查询、块比 T 大（只有一块）、块大小 1
@pytest.mark.parametrize("T, block_size", [(16, 4), (17, 4), (50, 16), (1, 8), (33, 64), (64, 64), (9, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiled_attention_equals_sdpa(T, block_size, dtype):
    """分块 + 在线 softmax 的结果等于 F.scaled_dot_product_attention(is_causal=True)；容差见 ATOL。"""
    g = torch.Generator().manual_seed(T * 100 + block_size)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, dtype=dtype) * 3 for _ in range(3))  # 乘 3：分数范围更大
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = tiled_attention(q, k, v, block_size)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL[dtype], rtol=0)


def test_tiled_attention_gradients_match_sdpa():
    q, k, v = (torch.randn(1, 2, 13, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grads_tiled = torch.autograd.grad(tiled_attention(q, k, v, 4).square().sum(), (q, k, v))
    grads_sdpa = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum(), (q, k, v))
    for a, b in zip(grads_tiled, grads_sdpa):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)  # float64，容差 1e-10
