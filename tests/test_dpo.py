"""DPO 选读笔记本：损失、回答对数概率、整理函数的掩码与冻结的参考模型（shared.dpo）。"""
import math
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from shared.dpo import (
    PreferenceDataset, collate_preference, dpo_loss, dpo_metrics, evaluate_dpo, frozen_copy, response_logprobs,
    sequence_logprobs, train_dpo,
)
from shared.instruct import format_prompt
from shared.model import GPTModel, model_config
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import configure_optimizer
from tests.conftest import available

X = -100  # IGNORE_INDEX


def bt_loss(margin):
    """-log σ(margin)，用 math 直接按公式计算。"""
    return math.log1p(math.exp(-margin))


# ---------- DPO 损失 ----------

def test_dpo_loss_equal_policy_and_reference_is_log2():
    logps = torch.tensor([-3.0, -17.5, -0.25])
    loss, chosen, rejected = dpo_loss(logps, logps - 2.0, logps, logps - 2.0, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))
    m = dpo_metrics(chosen, rejected)
    assert m["margin"] == 0.0 and m["accuracy"] == 0.5  # 平局算半个：起点是随机猜
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_loss_matches_formula_on_hand_computed_values():
    beta = 0.5
    pc, pr = torch.tensor([-8.0, -5.0, -4.0]), torch.tensor([-12.0, -7.0, -3.0])
    rc, rr = torch.tensor([-10.0, -5.0, -6.0]), torch.tensor([-10.0, -7.0, -6.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    # 间隔：0.5*(2) - 0.5*(-2) = 2；0 - 0 = 0；0.5*2 - 0.5*3 = -0.5
    margins = [2.0, 0.0, -0.5]
    assert chosen.tolist() == [1.0, 0.0, 1.0] and rejected.tolist() == [-1.0, 0.0, 1.5]
    assert loss.item() == pytest.approx(sum(bt_loss(m) for m in margins) / 3, abs=1e-6)
    metrics = dpo_metrics(chosen, rejected)
    assert metrics["margin"] == pytest.approx(sum(margins) / 3, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-6)
    assert metrics["chosen_reward"] == pytest.approx(2 / 3, abs=1e-6)


def test_dpo_loss_sign_and_gradient_direction():
    beta = 0.2
    ref = torch.tensor([-10.0, -10.0])
    # 策略更偏向 chosen（相对参考模型）时损失 < log 2，更偏向 rejected 时 > log 2
    good, _, _ = dpo_loss(ref + 1, ref - 1, ref, ref, beta=beta)
    bad, _, _ = dpo_loss(ref - 1, ref + 1, ref, ref, beta=beta)
    assert good.item() < math.log(2) < bad.item()
    # 梯度：d loss / d log π(y_w) = -β σ(-m) / B < 0，d loss / d log π(y_l) = +β σ(-m) / B > 0
    pc = torch.tensor([-9.0, -12.0], requires_grad=True)
    pr = torch.tensor([-11.0, -8.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, ref, ref, beta=beta)
    loss.backward()
    margins = [beta * (1 - (-1)), beta * (-2 - 2)]  # [0.4, -0.8]
    expected = [beta / (1 + math.exp(m)) / 2 for m in margins]  # β σ(-m) / B
    assert torch.allclose(pc.grad, -torch.tensor(expected), atol=1e-6)
    assert torch.allclose(pr.grad, torch.tensor(expected), atol=1e-6)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # 排错的样本（m < 0）梯度权重更大
    assert pc.grad[1].abs() > pc.grad[0].abs()
    # 一步梯度下降之后损失下降
    with torch.no_grad():
        loss_after, _, _ = dpo_loss(pc - 1.0 * pc.grad, pr - 1.0 * pr.grad, ref, ref, beta=beta)
    assert loss_after.item() < loss.item()


def test_dpo_loss_rejects_non_positive_beta():
    x = torch.zeros(2)
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta 必须 > 0"):
            dpo_loss(x, x, x, x, beta=beta)


# ---------- 整理函数 ----------

TOY_BATCH = [([1, 2, 3], [4, 5], [6]), ([7, 8], [9], [10, 11, 12])]


def test_collate_preference_masks_prompt_and_padding():
    out = collate_preference(TOY_BATCH, pad_id=0)
    assert set(out) == {"chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets"}
    assert out["chosen_inputs"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert out["chosen_targets"].tolist() == [[X, X, 4, 5, 0], [X, 9, 0, X, X]]
    assert out["rejected_inputs"].tolist() == [[1, 2, 3, 6, 0], [7, 8, 10, 11, 12]]
    assert out["rejected_targets"].tolist() == [[X, X, 6, 0, X], [X, 10, 11, 12, 0]]
    # 每行计入的目标 = 回答长度 + 1（结束符）
    for key, k in (("chosen_targets", 1), ("rejected_targets", 2)):
        assert (out[key] != X).sum(1).tolist() == [len(item[k]) + 1 for item in TOY_BATCH]


def test_collate_preference_default_pad_and_truncation():
    out = collate_preference([([5], [6], [7, 8])], allowed_max_length=2)
    assert out["chosen_inputs"].tolist() == [[5, 6]]
    assert out["chosen_targets"].tolist() == [[6, 50256]]
    assert out["rejected_inputs"].tolist() == [[5, 7]]
    assert out["rejected_targets"].tolist() == [[7, 8]]


# ---------- 回答的对数概率 ----------

def test_response_logprobs_ignores_prompt_and_padding():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    targets = torch.tensor([[X, X, 0, 1, 0], [X, 1, 0, X, X]])
    logits = probs.log().expand(2, 5, 4).clone()
    ignored = targets == X
    logits[ignored] = 50 * torch.randn(int(ignored.sum()), 4, generator=torch.Generator().manual_seed(0))
    got = response_logprobs(logits, targets)
    expected = torch.tensor([math.log(0.5) + math.log(0.25) + math.log(0.5), math.log(0.25) + math.log(0.5)])
    assert torch.allclose(got, expected, atol=1e-6)
    # 改变被屏蔽位置的 logits，结果不变（逐位精确相等）
    logits2 = logits.clone()
    logits2[ignored] = -logits2[ignored] + 7.0
    assert torch.equal(response_logprobs(logits2, targets), got)


def test_sequence_logprobs_on_a_model_ignores_padding_and_prompt_tokens():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=16, context_length=8, emb_dim=16)
    model = GPTModel(cfg).eval()
    batch = collate_preference([([1, 2, 3], [4, 5], [6]), ([7, 8], [9], [10, 11, 12])], pad_id=0)
    with torch.no_grad():
        got = sequence_logprobs(model, batch["chosen_inputs"], batch["chosen_targets"])
        # 逐条手算：只有第一条序列自己（不填充）时，回答 [4, 5] + 结束符 0 的对数概率之和
        logp = torch.log_softmax(model(torch.tensor([[1, 2, 3, 4, 5]])), -1)[0]
        first = logp[2, 4] + logp[3, 5] + logp[4, 0]
        logp = torch.log_softmax(model(torch.tensor([[7, 8, 9]])), -1)[0]
        second = logp[1, 9] + logp[2, 0]
    # 因果注意力：右侧填充不影响前面位置的 logits（浮点误差以内）
    assert torch.allclose(got, torch.stack([first, second]), atol=1e-5)


def test_response_logprobs_rejects_rows_without_response_tokens():
    with pytest.raises(ValueError, match="有序列没有任何回答 token"):
        response_logprobs(torch.zeros(2, 3, 4), torch.tensor([[X, 1, 2], [X, X, X]]))
    with pytest.raises(ValueError, match=r"logits \(2, 3, 4\) 与 targets \(2, 2\) 的前两维不一致"):
        response_logprobs(torch.zeros(2, 3, 4), torch.tensor([[1, 2], [3, 4]]))


# ---------- 数据集 ----------

def test_preference_dataset_encodes_and_skips_too_long():
    tok = available(get_gpt2_tokenizer)
    short = {"instruction": "Say hi.", "input": "", "chosen": "Hello there!", "rejected": "Hi."}
    long = {"instruction": "Say hi.", "input": "", "chosen": "Hello " * 100, "rejected": "Hi."}
    ds = PreferenceDataset([short, long], tok, max_length=64)
    assert len(ds) == 1 and ds.skipped == 1
    prompt, chosen, rejected = ds[0]
    assert prompt == tok.encode(format_prompt(short))
    assert chosen == tok.encode("Hello there!") and rejected == tok.encode("Hi.")
    assert len(PreferenceDataset([short, long], tok)) == 2


# ---------- 参考模型冻结 ----------

def _toy_preference_loader(seed=0, n=16, vocab=32):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, vocab, (k,), generator=g).tolist()
    items = [(rand(3), rand(2), rand(4)) for _ in range(n)]
    return DataLoader(items, batch_size=4, shuffle=True, drop_last=True, collate_fn=partial(collate_preference, pad_id=0),
                      generator=torch.Generator().manual_seed(seed))


def test_reference_model_stays_frozen_and_policy_learns():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=32, context_length=16, emb_dim=16)
    policy = GPTModel(cfg)
    reference = frozen_copy(policy)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(policy.parameters(), reference.parameters()))
    snapshot = {k: v.clone() for k, v in reference.state_dict().items()}
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    loader = _toy_preference_loader()
    optimizer = configure_optimizer(policy, lr=1e-2, weight_decay=0.0)
    history = train_dpo(policy, reference, loader, loader, optimizer, "cpu", beta=0.5, num_epochs=3, eval_every=12,
                        seed=0, progress=False)
    # 参考模型：逐位相同，仍然冻结
    assert all(torch.equal(snapshot[k], v) for k, v in reference.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in reference.parameters())
    # 策略：参数变了，第 0 步 log 2 / 0 / 0.5，训练后训练集损失下降、间隔为正
    assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())
    assert history["step"] == [0, 12]
    assert history["train_loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert history["train_margin"][0] == 0.0 and history["train_accuracy"][0] == 0.5
    assert history["train_loss"][-1] < math.log(2) and history["train_margin"][-1] > 0
    final = evaluate_dpo(policy, reference, loader, "cpu", beta=0.5)
    assert final["accuracy"] > 0.5


def test_train_dpo_refuses_unfrozen_reference():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=32, context_length=16, emb_dim=16)
    policy = GPTModel(cfg)
    loader = _toy_preference_loader()
    with pytest.raises(ValueError, match="参考模型的参数必须全部冻结"):
        train_dpo(policy, policy, loader, loader, configure_optimizer(policy, lr=1e-3), "cpu", beta=0.1,
                  num_epochs=1, eval_every=1, progress=False)


def test_evaluate_dpo_restores_training_mode():
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=32, context_length=16, emb_dim=16, drop_rate=0.5)
    policy = GPTModel(cfg).train()
    reference = frozen_copy(policy)
    loader = _toy_preference_loader()
    first = evaluate_dpo(policy, reference, loader, "cpu", beta=0.1)
    assert policy.training  # 评估时临时切到 eval（关掉 dropout），之后恢复
    assert first == evaluate_dpo(policy, reference, loader, "cpu", beta=0.1)  # eval 模式下没有随机性
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # 策略 = 参考：间隔全为 0


def test_sequence_logprobs_equals_the_full_logits_version_and_has_gradients():
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), vocab_size=32, context_length=12, emb_dim=16))
    batch = collate_preference([([1, 2, 3, 4], [5, 6], [7]), ([8, 9], [10, 11, 12], [13, 14])], pad_id=0)
    inputs, targets = batch["chosen_inputs"], batch["chosen_targets"]
    fast = sequence_logprobs(model, inputs, targets)
    full = response_logprobs(model(inputs), targets)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)  # 只是少算了提示词位置的输出层
    fast.sum().backward()
    assert model.tok_emb.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="有序列没有任何回答 token"):
        sequence_logprobs(model, inputs, torch.full_like(targets, -100))
