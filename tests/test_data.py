"""shared.data：按需切窗口的滑动窗口数据集 TokenWindows、数据加载器与正弦位置编码。"""
import math

import pytest
import torch

from shared.data import TokenWindows, create_dataloader, encode_text, sinusoidal_positions
from shared.tokenizer import EOT_ID, get_gpt2_tokenizer


class FakeTokenizer:
    """不管输入什么文本，都返回固定的 id 列表。"""

    def __init__(self, ids):
        self.ids = list(ids)

    def encode(self, text):
        return list(self.ids)


def windows(ds):
    return [(x.tolist(), y.tolist()) for x, y in (ds[k] for k in range(len(ds)))]


def test_windows_and_targets_exact():
    ds = TokenWindows(list(range(10, 20)), max_length=4, stride=3)
    # 10 个 token、L=4、S=3：起点 0, 3（起点 6 需要第 6+4=10 个 token 作目标，不存在）
    assert windows(ds) == [([10, 11, 12, 13], [11, 12, 13, 14]), ([13, 14, 15, 16], [14, 15, 16, 17])]
    x, y = ds[1]
    assert x.dtype == torch.long and y.dtype == torch.long


# 手数的窗口数：n 个 token、窗口长 L、步幅 S 时，起点 i = 0, S, 2S, … 且 i + L <= n - 1
@pytest.mark.parametrize("n, max_length, stride, expected", [
    (5, 4, 1, 1), (9, 4, 4, 2), (10, 4, 4, 2), (50, 7, 3, 15), (20, 4, 100, 1), (6, 4, 1, 2),
])
def test_window_count_and_shift(n, max_length, stride, expected):
    ids = list(range(100, 100 + n))
    ds = TokenWindows(ids, max_length=max_length, stride=stride)
    assert len(ds) == expected
    starts = [x[0] - 100 for x, _ in windows(ds)]
    assert starts == [k * stride for k in range(expected)]
    for x, y in windows(ds):
        assert y == [t + 1 for t in x]  # 连续的 id：目标就是输入右移一位
        assert len(x) == max_length


def test_windows_are_views_not_copies():
    """只存一份 id：窗口是原张量的视图，stride=1 时也不会把数据复制 max_length 遍。"""
    ids = torch.arange(1000)
    ds = TokenWindows(ids, max_length=64, stride=1)
    x, y = ds[500]
    assert x.data_ptr() == ds.ids[500:].data_ptr() and y.data_ptr() == ds.ids[501:].data_ptr()


def test_out_of_range_index_raises():
    ds = TokenWindows(list(range(10)), max_length=4, stride=3)
    with pytest.raises(IndexError, match=r"窗口下标 2 超出范围 \[0, 2\)"):
        ds[2]
    with pytest.raises(IndexError, match="窗口下标 -1"):
        ds[-1]


def test_real_tiktoken_case():
    tok = get_gpt2_tokenizer()
    text = "Hello, world. <|endoftext|> In the sunlit terraces"
    ids = encode_text(tok, text)
    assert EOT_ID in ids  # 特殊 token 被当作一个 token，而不是报错或被拆开
    assert tok.decode(ids) == text
    ds = TokenWindows(ids, max_length=3, stride=2)
    assert windows(ds) == [(ids[i:i + 3], ids[i + 1:i + 4]) for i in range(0, len(ids) - 3, 2)]


def test_too_short_raises():
    with pytest.raises(ValueError, match=r"max_length \+ 1 = 5"):
        TokenWindows([1, 2, 3, 4], max_length=4, stride=1)
    assert len(TokenWindows([1, 2, 3, 4, 5], max_length=4, stride=1)) == 1  # 恰好够一个窗口
    with pytest.raises(ValueError, match="一维"):
        TokenWindows(torch.zeros(2, 10, dtype=torch.long), max_length=4, stride=1)


@pytest.mark.parametrize("max_length, stride", [(0, 1), (4, 0), (4, -1)])
def test_bad_sizes_raise(max_length, stride):
    with pytest.raises(ValueError, match="必须是正整数"):
        TokenWindows(list(range(20)), max_length=max_length, stride=stride)


def test_dataloader_batch_shapes():
    loader = create_dataloader("x", batch_size=3, max_length=5, stride=5, shuffle=False,
                               tokenizer=FakeTokenizer(range(41)))
    # 41 个 token、L=5、S=5：起点 0, 5, …, 35（35+5=40 <= 40），共 8 个窗口；drop_last 后 2 个批次
    batches = list(loader)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == y.shape == (3, 5)
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert batches[0][0][:, 0].tolist() == [0, 5, 10]

    loader = create_dataloader("x", batch_size=3, max_length=5, stride=5, shuffle=False, drop_last=False,
                               tokenizer=FakeTokenizer(range(41)))
    assert [x.shape[0] for x, _ in loader] == [3, 3, 2]


def test_dataloader_default_tokenizer_is_gpt2():
    text = "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough"
    loader = create_dataloader(text, batch_size=2, max_length=4, stride=4, shuffle=False)
    x, y = next(iter(loader))
    ids = get_gpt2_tokenizer().encode(text)
    assert x.tolist() == [ids[0:4], ids[4:8]] and y.tolist() == [ids[1:5], ids[5:9]]


def test_seeded_shuffle_is_reproducible():
    def order(seed):
        loader = create_dataloader("x", batch_size=5, max_length=2, stride=2, seed=seed,
                                   tokenizer=FakeTokenizer(range(101)))
        return [x[:, 0].tolist() for x, _ in loader]

    torch.manual_seed(0)
    a = order(7)
    torch.manual_seed(999)  # 全局随机状态不影响带种子的加载器
    b = order(7)
    assert a == b
    assert a != order(8)
    starts = sorted(s for batch in a for s in batch)
    assert starts == list(range(0, 100, 2))  # 50 个窗口 = 10 个满批次：只是换了顺序，每个窗口恰好出现一次


def test_too_few_windows_for_one_batch_raises():
    with pytest.raises(ValueError, match="batch_size=4"):
        create_dataloader("x", batch_size=4, max_length=4, stride=4, tokenizer=FakeTokenizer(range(13)))
    loader = create_dataloader("x", batch_size=4, max_length=4, stride=4, drop_last=False,
                               tokenizer=FakeTokenizer(range(13)))
    assert sum(x.shape[0] for x, _ in loader) == 3


def test_short_real_text_raises_clear_error():
    with pytest.raises(ValueError, match=r"max_length \+ 1 = 9"):
        create_dataloader("Hi", batch_size=1, max_length=8, stride=8)


def test_sinusoidal_shape_and_position_zero():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16) and pe.dtype == torch.float32
    assert torch.equal(pe[0, 0::2], torch.zeros(8)) and torch.equal(pe[0, 1::2], torch.ones(8))  # sin 0 = 0, cos 0 = 1
    with pytest.raises(ValueError, match="dim 必须是偶数"):
        sinusoidal_positions(10, 7)


def test_sinusoidal_values_match_formula():
    """逐个元素与 math.sin / math.cos 手算的公式对照（float32 舍入内）。"""
    dim, pe = 12, sinusoidal_positions(300, 12)
    for pos in (1, 5, 123, 299):
        for i in range(dim // 2):
            w = 10000 ** (-2 * i / dim)
            assert abs(pe[pos, 2 * i].item() - math.sin(pos * w)) < 1e-6
            assert abs(pe[pos, 2 * i + 1].item() - math.cos(pos * w)) < 1e-6


@pytest.mark.parametrize("k", [1, 3, 17, 100])
def test_sinusoidal_shift_is_a_rotation(k):
    """PE(pos+k) = R(k) PE(pos)：R(k) 由公式单独构造（每对维度一个 2x2 旋转），对所有 pos 相同。"""
    n, dim = 256, 32
    pe = sinusoidal_positions(n, dim).double()
    R = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim // 2):
        a = k * 10000 ** (-2 * i / dim)
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    err = (pe[k:] - pe[:-k] @ R.T).abs().max().item()
    assert err < 1e-6, f"max |PE(pos+k) - R(k) PE(pos)| = {err:.2e}，容差 1e-6"
