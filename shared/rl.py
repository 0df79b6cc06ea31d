"""可验证奖励的强化学习 (RLVR)：按组采样回答、GRPO 的组内相对优势、截断比值 + KL 惩罚的损失与训练循环，
在 06_finetuning/bonus_tang_poetry_sft_rl 中讲解。"""
import numpy as np
import pandas as pd
import torch

from .dpo import token_logprobs
from .generate import generate
from .instruct import collate_instruction
from .train import IGNORE_INDEX, cosine_schedule, train_loop

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/bonus_tang_poetry_sft_rl.ipynb ----
def sample_completions(model, prompts, k, max_new_tokens, eos_id, temperature=1.0, allowed=None, generator=None,
                       batch_size=256):
    """每条提示词采样 k 个回答（同一提示词的 k 个相邻）。prompts: (P, T) 等长提示词的 token id。
    返回 P·k 个 (回答的 token id 列表, 是否以 eos 结束)；回答不含 eos。用 shared.generate.generate 逐批采样。"""
    if prompts.ndim != 2:
        raise ValueError(f"prompts 应是形状 (P, T) 的等长提示词，收到形状 {tuple(prompts.shape)}")
    idx = prompts.repeat_interleave(k, dim=0)
    rows = []
    for start in range(0, len(idx), batch_size):
        out = generate(model, idx[start:start + batch_size], max_new_tokens, temperature=temperature, eos_id=eos_id,
                       allowed=allowed, generator=generator)
        rows += out[:, idx.shape[1]:].tolist()
    return [(row[:row.index(eos_id)], True) if eos_id in row else (row, False) for row in rows]


def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO 的优势：rewards（长度 N）按顺序每 group_size 个一组（同一提示词的 k 个回答），组内标准化
    (r - 组均值) / (组标准差 + eps)。一组的奖励全部相同时，这一组的优势全是 0。"""
    rewards = torch.as_tensor(np.array(rewards, dtype=np.float32))
    if group_size < 2 or rewards.ndim != 1 or len(rewards) % group_size:
        raise ValueError(f"rewards 的长度 {len(rewards)} 应是 group_size={group_size}（≥ 2）的整数倍")
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)).flatten()


def completion_batch(prompts, completions, eos_id):
    """等长提示词 (P, T) 与 sample_completions 的 P·k 个回答 -> (inputs, targets)：第 6 章的 collate_instruction
    （以 eos 填充、提示词的目标记为 IGNORE_INDEX）；没写完（没有 eos）的回答，最后那个补出来的 eos 目标也屏蔽掉。"""
    k = len(completions) // len(prompts)
    rows = [(p + ids, len(p)) for p, (ids, _) in zip((p for p in prompts.tolist() for _ in range(k)), completions)]
    inputs, targets = collate_instruction(rows, pad_id=eos_id, mask_prompt=True)
    for row, ((ids, _), (_, ended)) in enumerate(zip(rows, completions)):
        if not ended:
            targets[row, len(ids) - 1] = IGNORE_INDEX
    return inputs.to(prompts.device), targets.to(prompts.device)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.04):
    """GRPO 的损失（越小越好）与统计量。logp / old_logp / ref_logp / mask：(B, T)，advantages：(B,)。
    每个 token：ρ = exp(logp - old_logp)，目标 min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) - kl_coef·k3，
    k3 = exp(ref - logp) - (ref - logp) - 1；先在每个回答内对 token 求平均，再对回答求平均，取负号。"""
    mask = mask.float()
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("有回答没有任何计分的 token（mask 全为 0）")
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    delta = ref_logp - logp
    k3 = torch.exp(delta) - delta - 1
    loss = -(((surrogate - kl_coef * k3) * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    with torch.no_grad():
        n = mask.sum()
        stats = {"kl_k3": ((k3 * mask).sum() / n).item(),
                 "clipped": ((((ratio - 1).abs() > clip_eps).float() * mask).sum() / n).item()}
    return loss, stats


def train_grpo(policy, reference, optimizer, prompts, reward_fn, *, rollouts, prompts_per_rollout, group_size,
               max_new_tokens, eos_id, inner_steps=2, clip_eps=0.2, kl_coef=0.04, temperature=1.0, allowed=None,
               lr=None, warmup=0.1, grad_clip=1.0, seed=0, progress=True):
    """GRPO：rollouts 轮，每轮从 prompts（等长 token id 列表的列表）里随机取 prompts_per_rollout 条，每条采样 group_size 个回答，
    reward_fn(提示词下标, 回答 token id 列表, 是否写完) -> {"reward": 数值, 其他要记录的数值...}，
    算 group_advantages，再做 inner_steps 次 grpo_loss 的更新（第 5 章的 train_loop；lr 给定时余弦调度，前 warmup 比例的步数预热）。
    返回每轮一行的 DataFrame：reward_fn 各项的均值、回答长度、序列级 KL 估计 mean Σ_t(log π_old - log π_ref)、
    优势为 0 的组所占比例，以及最后一次更新的 kl_k3 与 clipped。"""
    if any(p.requires_grad for p in reference.parameters()):
        raise ValueError("参考模型的参数必须全部冻结（用 shared.dpo.frozen_copy 创建）")
    device = next(policy.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    sampler = torch.Generator(device).manual_seed(seed)
    history = []

    def batches():
        while True:
            pick = torch.randperm(len(prompts), generator=rng)[:prompts_per_rollout].tolist()
            prompt_ids = torch.tensor([prompts[i] for i in pick], device=device)
            completions = sample_completions(policy, prompt_ids, group_size, max_new_tokens, eos_id, temperature,
                                             allowed, sampler)
            scores = pd.DataFrame([reward_fn(pick[j // group_size], ids, ended) for j, (ids, ended) in enumerate(completions)])
            advantages = group_advantages(scores["reward"].to_numpy(), group_size).to(device)
            inputs, targets = completion_batch(prompt_ids, completions, eos_id)
            with torch.no_grad():
                old_logp, ref_logp = token_logprobs(policy, inputs, targets), token_logprobs(reference, inputs, targets)
            history.append({**scores.mean(numeric_only=True).to_dict(),
                            "length": float(np.mean([len(ids) for ids, _ in completions])),
                            "kl": (old_logp - ref_logp).sum(dim=1).mean().item(),
                            "flat groups": (advantages.view(-1, group_size).abs().sum(dim=1) == 0).float().mean().item()})
            batch = {"inputs": inputs, "targets": targets, "old": old_logp, "ref": ref_logp, "adv": advantages}
            for _ in range(inner_steps):
                yield batch

    def loss_fn(batch):
        logp = token_logprobs(policy, batch["inputs"], batch["targets"])
        loss, stats = grpo_loss(logp, batch["old"], batch["ref"], batch["adv"], batch["targets"] != IGNORE_INDEX,
                                clip_eps, kl_coef)
        history[-1].update(stats)
        return loss

    steps = rollouts * inner_steps
    train_loop(policy, optimizer, batches(), loss_fn, range(steps), grad_clip=grad_clip, seed=seed, progress=progress,
               lr_at=None if lr is None else cosine_schedule(lr, int(warmup * steps), steps), desc="grpo")
    return pd.DataFrame(history)
