"""shared.rl：按组采样、组内相对优势、GRPO 损失（与手算的损失和梯度对照）与训练循环（06_finetuning/bonus_tang_poetry_sft_rl）。"""
import pytest
import torch

from shared.dpo import frozen_copy, token_logprobs
from shared.model import GPTModel, model_config
from shared.rl import completion_batch, group_advantages, grpo_loss, sample_completions, train_grpo
from shared.train import IGNORE_INDEX


def test_group_advantages_by_hand():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], group_size=4)
    # 第一组：均值 0.25，样本标准差 0.5；第二组奖励全相同，优势全是 0（误差 1e-3 来自 eps）
    torch.testing.assert_close(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=0, atol=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="整数倍"):
        group_advantages([1.0, 0.0, 1.0], group_size=2)
    with pytest.raises(ValueError, match="整数倍"):
        group_advantages([1.0, 0.0], group_size=1)


def test_grpo_loss_and_gradient_match_a_hand_computation():
    """玩具策略：一个 3 类分布 softmax(θ)，每个回答只有 1 个 token。"""
    theta = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0])  # 旧策略：均匀分布
    ref = torch.tensor([0.1, 0.3, -0.2])
    tokens, adv, eps, beta = torch.tensor([0, 2, 1]), torch.tensor([1.0, 2.0, -1.0]), 0.2, 0.1
    logp_all, old_all, ref_all = theta.log_softmax(0), old.log_softmax(0), ref.log_softmax(0)
    logp, old_logp, ref_logp = logp_all[tokens][:, None], old_all[tokens][:, None], ref_all[tokens][:, None]
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, torch.ones(3, 1), clip_eps=eps, kl_coef=beta)

    # 手算：逐个回答
    p = theta.detach().softmax(0)
    expected_loss, expected_grad = 0.0, torch.zeros(3)
    for y, a in zip(tokens.tolist(), adv.tolist()):
        lp, lo, lr = logp_all[y].item(), old_all[y].item(), ref_all[y].item()
        rho = torch.exp(torch.tensor(lp - lo)).item()
        clipped = min(max(rho, 1 - eps), 1 + eps)
        delta = lr - lp
        k3 = torch.exp(torch.tensor(delta)).item() - delta - 1
        expected_loss += -(min(rho * a, clipped * a) - beta * k3) / 3
        grad_logp = torch.nn.functional.one_hot(torch.tensor(y), 3).float() - p  # ∂ log softmax(θ)_y / ∂θ
        active = rho * a <= clipped * a  # min 取到未截断的一支时，比值项才有梯度
        d_surrogate = rho * a if active else 0.0  # ∂(ρA)/∂logp = ρA
        d_k3 = 1 - torch.exp(torch.tensor(delta)).item()  # ∂k3/∂logp = 1 - e^δ
        expected_grad += -(d_surrogate - beta * d_k3) * grad_logp / 3
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)  # 容差 1e-6
    torch.testing.assert_close(theta.grad, expected_grad, rtol=0, atol=1e-6)
    # ρ = 3·softmax(θ)_y：第一个 ≈ 1.01 在区间内；第二个 ≈ 1.24 > 1.2 且 A > 0、第三个 ≈ 0.75 < 0.8 且 A < 0，
    # 两个都取到截断的一支（比值项没有梯度，上面的手算已核对）
    assert stats["clipped"] == pytest.approx(2 / 3)


def test_grpo_loss_rejects_an_empty_mask():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="没有任何计分的 token"):
        grpo_loss(z, z, z, torch.zeros(2), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def tiny_policy(vocab=3, seed=0):
    torch.manual_seed(seed)
    return GPTModel(dict(model_config("tiny"), vocab_size=vocab, context_length=8, emb_dim=16, n_heads=2, n_layers=1))


def test_completion_batch_masks_prompt_and_unfinished_eos():
    prompts = torch.tensor([[0, 1]])
    completions = [([2, 2], True), ([1, 2, 1], False)]
    inputs, targets = completion_batch(prompts, completions, eos_id=0)
    assert inputs.tolist() == [[0, 1, 2, 2, 0], [0, 1, 1, 2, 1]]
    assert targets.tolist() == [[IGNORE_INDEX, 2, 2, 0, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 1, IGNORE_INDEX]]
    model = tiny_policy()
    logp = token_logprobs(model, inputs, targets)
    full = model(inputs).log_softmax(-1)
    torch.testing.assert_close(logp[0, 1], full[0, 1, 2], rtol=0, atol=1e-6)
    assert logp[0, 0] == 0 and logp[1, 4] == 0


def test_sample_completions_groups_and_stops_at_eos():
    model = tiny_policy(vocab=4)
    out = sample_completions(model, torch.tensor([[0, 1], [1, 1]]), k=3, max_new_tokens=5, eos_id=3,
                             generator=torch.Generator().manual_seed(0))
    assert len(out) == 6
    for ids, ended in out:
        assert 3 not in ids and (ended or len(ids) == 5)
    with pytest.raises(ValueError, match="等长提示词"):
        sample_completions(model, torch.tensor([0, 1]), k=2, max_new_tokens=2, eos_id=3)


def run_toy(reward, rollouts, lr):
    """2 个可选 token（1 与 2）的玩具问题：提示词 [0]，只写 1 个 token（0 兼作 eos，但不允许采样）。"""
    policy = tiny_policy()
    reference = frozen_copy(policy)
    allowed = lambda idx: torch.tensor([False, True, True]).expand(idx.shape[0], -1)
    history = train_grpo(policy, reference, torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0), [[0]],
                         lambda i, ids, ended: {"reward": reward(ids)}, rollouts=rollouts, prompts_per_rollout=1,
                         group_size=8, max_new_tokens=1, eos_id=0, allowed=allowed, seed=0, progress=False)
    return policy, reference, history


def test_zero_advantage_leaves_parameters_unchanged():
    policy, reference, history = run_toy(lambda ids: 1.0, rollouts=3, lr=1e-2)
    assert (history["flat groups"] == 1).all()
    for p, q in zip(policy.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_grpo_learns_the_rewarded_token():
    policy, _, history = run_toy(lambda ids: float(ids == [1]), rollouts=30, lr=1e-2)
    with torch.no_grad():
        probs = policy(torch.tensor([[0]]))[0, -1, 1:].softmax(-1)
    assert probs[0] > 0.95, probs  # 一开始约 0.5
    assert history["reward"].iloc[-5:].mean() > 0.9


def test_train_grpo_wants_a_frozen_reference():
    policy = tiny_policy()
    with pytest.raises(ValueError, match="参考模型的参数必须全部冻结"):
        train_grpo(policy, tiny_policy(), torch.optim.SGD(policy.parameters(), lr=0.1), [[0]],
                   lambda i, ids, ended: {"reward": 0.0}, rollouts=1, prompts_per_rollout=1, group_size=2,
                   max_new_tokens=1, eos_id=0)
