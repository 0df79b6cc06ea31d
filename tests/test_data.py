"""shared.data：滑动窗口数据集与数据加载器。"""
import pytest
import torch

from shared.data import GPTDataset, create_dataloader
from shared.tokenizer import get_gpt2_tokenizer


class FakeTokenizer:
    """不管输入什么文本，都返回固定的 id 列表。"""

    def __init__(self, ids):
        self.ids = list(ids)

    def encode(self, text):
        return list(self.ids)


def rows(tensors):
    return [t.tolist() for t in tensors]


def test_windows_and_targets_exact():
    ds = GPTDataset("ignored", FakeTokenizer(range(10, 20)), max_length=4, stride=3)
    # 10 个词元、L=4、S=3：起点 0, 3（起点 6 需要第 6+4=10 个词元作目标，不存在）
    assert len(ds) == 2
    assert rows(ds.input_ids) == [[10, 11, 12, 13], [13, 14, 15, 16]]
    assert rows(ds.target_ids) == [[11, 12, 13, 14], [14, 15, 16, 17]]
    x, y = ds[1]
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.tolist() == [13, 14, 15, 16] and y.tolist() == [14, 15, 16, 17]


@pytest.mark.parametrize("n, max_length, stride", [(5, 4, 1), (9, 4, 4), (10, 4, 4), (50, 7, 3), (20, 4, 100)])
def test_window_count_and_shift(n, max_length, stride):
    ids = list(range(100, 100 + n))
    ds = GPTDataset("ignored", FakeTokenizer(ids), max_length=max_length, stride=stride)
    assert len(ds) == (n - max_length - 1) // stride + 1
    for k, (x, y) in enumerate(zip(ds.input_ids, ds.target_ids)):
        start = k * stride
        assert x.tolist() == ids[start:start + max_length]
        assert y.tolist() == ids[start + 1:start + max_length + 1]


def test_real_tiktoken_case():
    tok = get_gpt2_tokenizer()
    text = "Hello, world. <|endoftext|> In the sunlit terraces"
    ids = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in ids  # 特殊词元被当作一个词元，而不是报错或被拆开
    ds = GPTDataset(text, tok, max_length=3, stride=2)
    assert rows(ds.input_ids) == [ids[i:i + 3] for i in range(0, len(ids) - 3, 2)]
    assert rows(ds.target_ids) == [ids[i + 1:i + 4] for i in range(0, len(ids) - 3, 2)]


def test_too_short_text_raises():
    with pytest.raises(ValueError, match="max_length"):
        GPTDataset("x", FakeTokenizer([1, 2, 3, 4]), max_length=4, stride=1)
    GPTDataset("x", FakeTokenizer([1, 2, 3, 4, 5]), max_length=4, stride=1)  # 恰好够一个窗口
    with pytest.raises(ValueError):
        GPTDataset("Hi", get_gpt2_tokenizer(), max_length=8, stride=8)


@pytest.mark.parametrize("max_length, stride", [(0, 1), (4, 0), (4, -1)])
def test_bad_sizes_raise(max_length, stride):
    with pytest.raises(ValueError):
        GPTDataset("x", FakeTokenizer(range(20)), max_length=max_length, stride=stride)


def test_dataloader_batch_shapes():
    loader = create_dataloader("x", batch_size=3, max_length=5, stride=5, shuffle=False,
                               tokenizer=FakeTokenizer(range(41)))
    # (41 - 5 - 1) // 5 + 1 = 8 个窗口，drop_last 后 2 个批次
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
    with pytest.raises(ValueError, match="batch_size"):
        create_dataloader("x", batch_size=4, max_length=4, stride=4, tokenizer=FakeTokenizer(range(13)))
    loader = create_dataloader("x", batch_size=4, max_length=4, stride=4, drop_last=False,
                               tokenizer=FakeTokenizer(range(13)))
    assert sum(x.shape[0] for x, _ in loader) == 3
