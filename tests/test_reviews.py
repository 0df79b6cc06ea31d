"""选读“中文评论分类实验”：取哪个位置分类（池化与填充）、字 n-gram 基线、学习曲线的子集、数据清洗与切分。"""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import shared.reviews as reviews
from shared.classifier import (collate_classification, first_token_logits, last_token_logits, mean_pooled_logits,
                               predict_loader)
from shared.download import HOTEL_REVIEWS, WAIMAI_10K
from shared.model import GPTModel, model_config
from shared.reviews import (PAD_ID, UNK_ID, CharTokenizer, NgramLogReg, load_reviews, nested_subsets, ngram_accuracy,
                            ngrams, stratified_split, train_ngram_logreg)
from tests.conftest import available

POOLS = (first_token_logits, last_token_logits, mean_pooled_logits)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), vocab_size=20, context_length=16, drop_rate=0.0))
    model.out_head = nn.Linear(model.cfg["emb_dim"], 2)
    return model.eval()


SEQS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]]


@pytest.mark.parametrize("pool", POOLS, ids=lambda f: f.__name__)
def test_pooling_ignores_padding(classifier, pool):
    """一批右侧填充的序列与逐条不填充地单独计算，结果相同（容差 1e-5）；换一个填充 id 也不变。"""
    with torch.no_grad():
        alone = torch.cat([pool(classifier, torch.tensor([s]), torch.tensor([len(s)])) for s in SEQS])
        for pad_id in (0, 19):
            ids, lengths, _ = collate_classification([(s, 0) for s in SEQS], pad_id=pad_id)
            assert ids.shape == (3, 7)
            torch.testing.assert_close(pool(classifier, ids, lengths), alone, atol=1e-5, rtol=0)


def test_pooling_picks_the_right_positions(classifier):
    """与逐位置的输出手工对照：第一个、最后一个真实位置，以及真实位置的平均（容差 1e-6）。"""
    ids, lengths, _ = collate_classification([(s, 0) for s in SEQS], pad_id=0)
    with torch.no_grad():
        full = classifier(ids)
        first, last, mean = (pool(classifier, ids, lengths) for pool in POOLS)
    for row, s in enumerate(SEQS):
        n = len(s)
        torch.testing.assert_close(first[row], full[row, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(last[row], full[row, n - 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(mean[row], sum(full[row, t] for t in range(n)) / n, atol=1e-6, rtol=0)


def test_mean_pooling_equals_head_of_mean_hidden_state(classifier):
    """线性输出头与平均可交换：对 logits 取平均 = 对最后的隐藏状态取平均再过输出头（容差 1e-5）。"""
    ids = torch.tensor([SEQS[2]])
    hidden = {}
    handle = classifier.final_norm.register_forward_hook(lambda m, i, out: hidden.update(h=out))
    with torch.no_grad():
        pooled = mean_pooled_logits(classifier, ids, torch.tensor([7]))
    handle.remove()
    torch.testing.assert_close(pooled, classifier.out_head(hidden["h"].mean(dim=1)), atol=1e-5, rtol=0)


def test_predict_loader_uses_the_given_pool(classifier):
    batch = collate_classification([(s, 1) for s in SEQS], pad_id=0)
    logits, labels = predict_loader(classifier, [batch], "cpu", pool=first_token_logits)
    with torch.no_grad():
        expected = classifier(batch[0])[:, 0]
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    assert labels.tolist() == [1, 1, 1]


def test_ngrams_on_a_crafted_example():
    assert ngrams("好吃好吃", 2) == ["好", "吃", "好吃", "吃好"]  # 去重，按首次出现的顺序
    assert ngrams("不好", 3) == ["不", "好", "不好"]
    assert ngrams("", 2) == []


def test_ngram_features_and_logistic_regression():
    texts = ["好吃", "好吃好吃", "难吃", "不好"]
    model = NgramLogReg(texts, n_max=2, min_count=2)
    assert set(model.vocab) == {"好", "吃", "好吃"}  # 出现在至少 2 条文本里的 n-gram（每条只计一次）
    ids, offsets = model.encode(["好吃", "难", "吃吃"])
    v = model.vocab
    assert offsets.tolist() == [0, 3, 3]  # “难”不在词表里：空的词袋
    assert ids.tolist() == [v["好"], v["吃"], v["好吃"], v["吃"]]
    with torch.no_grad():
        model.weights.weight[:, 0] = torch.tensor([1.0, 2.0, 4.0])[[v["好"], v["吃"], v["好吃"]]]
        model.bias.fill_(-0.5)
        torch.testing.assert_close(model(ids, offsets), torch.tensor([6.5, -0.5, 1.5]))  # 吃吃 -> 只计一次“吃”


def test_ngram_logreg_learns_a_separable_toy_problem():
    df = pd.DataFrame({"text": ["很好吃", "好吃极了", "真好吃", "太难吃", "难吃死了", "真难吃"] * 3,
                       "label": [1, 1, 1, 0, 0, 0] * 3})
    model = train_ngram_logreg(df, epochs=50)
    assert ngram_accuracy(model, pd.DataFrame({"text": ["好吃", "难吃"], "label": [1, 0]})) == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_nested_subsets_are_stratified_and_nested(seed):
    labels = np.array([0] * 70 + [1] * 30)
    np.random.default_rng(5).shuffle(labels)
    sizes = [4, 10, 33, 100]
    subsets = nested_subsets(labels, sizes, seed=seed)
    for small, big in zip(sizes, sizes[1:]):
        assert list(subsets[small]) == list(subsets[big][:small])  # 嵌套：小子集是大子集的前缀
    for n in sizes:
        idx = subsets[n]
        assert len(set(idx.tolist())) == n
        assert abs(labels[idx].sum() - 0.3 * n) <= 1  # 分层：正类条数与 30% 之差不超过 1 条
    other = nested_subsets(labels, sizes, seed=seed + 10)[10]
    assert set(other.tolist()) != set(subsets[10].tolist())  # 换种子换样本


def test_nested_subsets_reject_bad_sizes():
    with pytest.raises(ValueError, match="子集大小应在 1 到 3 之间"):
        nested_subsets([0, 1, 0], [4])


def test_stratified_split_keeps_class_shares_and_is_disjoint():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(200)], "label": [1] * 60 + [0] * 140})
    parts = stratified_split(df, (0.7, 0.1, 0.2), seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [140, 20, 40]
    assert [int(parts[k]["label"].sum()) for k in ("train", "val", "test")] == [42, 6, 12]
    assert set().union(*(set(p["text"]) for p in parts.values())) == set(df["text"])
    with pytest.raises(ValueError, match="fractions 应是三个加起来为 1 的比例"):
        stratified_split(df, (0.5, 0.5, 0.5))


def test_load_reviews_cleans(tmp_path, monkeypatch):
    csv = tmp_path / "r.csv"
    csv.write_text("label,review\n1,好吃\n1, 好吃 \n0,一般\n1,一般\n0,\n0,难吃\n", encoding="utf-8")
    monkeypatch.setattr(reviews, "download", lambda url: csv)
    df, report = load_reviews("https://example.org/r.csv")
    assert df.to_dict("list") == {"text": ["好吃", "难吃"], "label": [1, 0]}
    assert report == {"rows": 6, "empty": 1, "conflicting": 2, "duplicates": 1, "kept": 2}
    csv.write_text("label,text\n1,好吃\n", encoding="utf-8")
    with pytest.raises(ValueError, match="应为 label\\(0/1\\),review 两列"):
        load_reviews("https://example.org/r.csv")


@pytest.mark.parametrize("url, kept", [(WAIMAI_10K, 11973), (HOTEL_REVIEWS, 7765)])
def test_real_review_sets(url, kept):
    df, report = available(lambda: load_reviews(url))
    assert report["kept"] == len(df) == kept
    assert not df["text"].duplicated().any() and df["label"].isin([0, 1]).all()


def test_char_tokenizer():
    tok = CharTokenizer(["好吃好吃好", "吃饭"], min_count=2)
    assert tok.chars[:3] == ["<pad>", "<unk>", "<sep>"] and PAD_ID == 0 and UNK_ID == 1
    assert tok.encode("好饭") == [tok.ids["好"], UNK_ID]  # “饭”只出现 1 次，不进词表
    assert tok.decode(tok.encode("吃好")) == "吃好"
    assert len(tok) == 5
