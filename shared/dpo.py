"""偏好对齐 (preference alignment)：直接偏好优化 (Direct Preference Optimization, DPO) 的数据集与整理函数、
回答部分的序列对数概率、冻结的参考模型、DPO 损失与隐式奖励指标，以及 DPO 训练循环，在 06_finetuning/bonus_dpo 中讲解。"""
import copy

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .download import PREFERENCE_DATA
from .instruct import collate_instruction, format_prompt, load_instruction_data
from .runtime import eval_mode
from .tokenizer import EOT_ID
from .train import IGNORE_INDEX, autocast, cosine_schedule, endless_batches, train_loop

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/bonus_dpo.ipynb ----
def load_preference_data():
    """读取 instruction-data-with-preference.json：每条有 instruction、input、output、chosen 与 rejected。"""
    return load_instruction_data(PREFERENCE_DATA, ("instruction", "input", "chosen", "rejected"))


class PreferenceDataset(Dataset):
    """每条偏好样本编码为 (prompt_ids, chosen_ids, rejected_ids)，提示词用第 6 章的 format_prompt。给出 max_length 时，
    跳过“提示词 + 较长的回答”超过它的样本（截断会切掉回答，偏好比较就不公平了），条数记在 self.skipped。"""

    def __init__(self, data, tokenizer, max_length=None):
        self.items, self.skipped = [], 0
        for entry in data:
            prompt = tokenizer.encode(format_prompt(entry))
            chosen, rejected = tokenizer.encode(entry["chosen"]), tokenizer.encode(entry["rejected"])
            if max_length is not None and len(prompt) + max(len(chosen), len(rejected)) > max_length:
                self.skipped += 1
                continue
            self.items.append((prompt, chosen, rejected))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_preference(batch, pad_id=EOT_ID, allowed_max_length=None):
    """[(prompt_ids, chosen_ids, rejected_ids), ...] -> {"chosen_inputs", "chosen_targets", "rejected_inputs",
    "rejected_targets"}：两边都由 collate_instruction(mask_prompt=True) 处理，只有回答 token 与其后的结束符留作目标。"""
    out = {}
    for name, k in (("chosen", 1), ("rejected", 2)):
        seqs = [(item[0] + item[k], len(item[0])) for item in batch]
        out[f"{name}_inputs"], out[f"{name}_targets"] = collate_instruction(
            seqs, pad_id=pad_id, ignore_index=IGNORE_INDEX, allowed_max_length=allowed_max_length, mask_prompt=True)
    return out


def response_mask(targets, ignore_index=IGNORE_INDEX):
    """回答 token 的位置 targets != ignore_index；某一行一个都没有时报错（它的对数概率无从谈起）。"""
    keep = targets != ignore_index
    if not keep.any(dim=1).all():
        raise ValueError("有序列没有任何回答 token（全部被屏蔽或截断），无法计算回答的对数概率")
    return keep


def response_logprobs(logits, targets, ignore_index=IGNORE_INDEX):
    """每条序列回答部分的对数概率之和 sum_t log p(targets[t])，跳过 targets == ignore_index 的位置。
    logits: (B, T, V)，targets: (B, T) -> (B,)。某一行没有任何回答 token 时报错。"""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} 与 targets {tuple(targets.shape)} 的前两维不一致")
    response_mask(targets, ignore_index)  # 先检查每一行都有回答 token
    token_logprobs = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                      ignore_index=ignore_index, reduction="none")  # 被屏蔽的位置为 0
    return token_logprobs.view(targets.shape).sum(dim=1)


def token_logprobs(model, inputs, targets):
    """每个回答 token 的对数概率 log π(y_t | x, y_<t)，形状 (B, T)，提示词与填充的位置为 0。
    只在回答位置算输出层（GPTModel 的 keep 参数）。某一行没有回答 token 时报错。"""
    keep = response_mask(targets)
    out = torch.zeros(targets.shape, device=targets.device)
    out[keep] = -F.cross_entropy(model(inputs, keep=keep).float(), targets[keep], reduction="none")
    return out


def sequence_logprobs(model, inputs, targets):
    """模型给每条序列回答部分的对数概率 log π(y|x)，形状 (B,)：token_logprobs 按行求和（index_add 只加回答位置）。
    与 response_logprobs(model(inputs), targets) 的结果在浮点误差以内相同，计算少得多。"""
    keep = response_mask(targets)
    logps = token_logprobs(model, inputs, targets)[keep]
    return logps.new_zeros(len(targets)).index_add(0, keep.nonzero()[:, 0], logps)


def frozen_copy(model):
    """参考模型：model 的深拷贝（不共享任何参数），eval 模式，所有参数 requires_grad=False。"""
    return copy.deepcopy(model).eval().requires_grad_(False)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """DPO 损失：-log σ(β[(log π_c - log π_ref,c) - (log π_r - log π_ref,r)]) 的批平均。
    四个输入都是形状 (B,) 的回答对数概率。返回 (loss, chosen_rewards, rejected_rewards)，隐式奖励已 detach，只用于观察。"""
    if not beta > 0:
        raise ValueError(f"beta 必须 > 0，收到 {beta!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metrics(chosen_rewards, rejected_rewards):
    """由隐式奖励得到指标：DPO 损失、平均奖励、奖励间隔、偏好准确率（间隔 > 0 的比例，平局算一半）。"""
    margins = chosen_rewards - rejected_rewards
    return {"loss": -F.logsigmoid(margins).mean().item(), "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(), "margin": margins.mean().item(),
            "accuracy": ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()}


def dpo_rewards(policy, reference, batch, device, beta):
    """一个批次：返回 (loss, chosen_rewards, rejected_rewards)。参考模型的前向不记录梯度。"""
    batch = {k: v.to(device) for k, v in batch.items()}
    policy_chosen = sequence_logprobs(policy, batch["chosen_inputs"], batch["chosen_targets"])
    policy_rejected = sequence_logprobs(policy, batch["rejected_inputs"], batch["rejected_targets"])
    with torch.no_grad():
        ref_chosen = sequence_logprobs(reference, batch["chosen_inputs"], batch["chosen_targets"])
        ref_rejected = sequence_logprobs(reference, batch["rejected_inputs"], batch["rejected_targets"])
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


@torch.no_grad()
def evaluate_dpo(policy, reference, loader, device, beta, num_batches=None):
    """在 eval 模式下用前 num_batches 个批次（None 为全部）计算 dpo_metrics，按样本平均。"""
    chosen, rejected = [], []
    with eval_mode(policy):
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            _, c, r = dpo_rewards(policy, reference, batch, device, beta)
            chosen.append(c)
            rejected.append(r)
    if not chosen:
        raise ValueError("评估用的 loader 是空的")
    return dpo_metrics(torch.cat(chosen), torch.cat(rejected))


DPO_METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")


def train_dpo(policy, reference, train_loader, val_loader, optimizer, device, *, beta, num_epochs, eval_every,
              eval_batches=None, max_lr=None, warmup_steps=0, grad_clip=1.0, seed=None, progress=True,
              autocast_dtype=None):
    """DPO 训练 num_epochs 个 epoch，返回 history：{"step": [...], "train_loss": [...], "val_margin": [...], ...}。
    优化交给第 5 章的 train_loop（max_lr 给定时按 cosine_schedule 调度）；训练前、每 eval_every 步与最后一步之后，
    在训练集与验证集的前 eval_batches 个批次上评估 DPO_METRICS。"""
    if any(p.requires_grad for p in reference.parameters()):
        raise ValueError("参考模型的参数必须全部冻结（用 frozen_copy 创建）")
    max_steps = num_epochs * len(train_loader)
    if max_steps == 0:
        raise ValueError("train_loader 是空的：数据太少，或 batch_size 太大且 drop_last=True")
    history = {"step": [], **{f"{split}_{k}": [] for split in ("train", "val") for k in DPO_METRICS}}

    def log(step):
        history["step"].append(step)
        for split, loader in (("train", train_loader), ("val", val_loader)):
            for k, v in evaluate_dpo(policy, reference, loader, device, beta, eval_batches).items():
                history[f"{split}_{k}"].append(v)
        if progress:
            print(f"step {step:4d} | loss train {history['train_loss'][-1]:.3f} val {history['val_loss'][-1]:.3f}"
                  f" | margin val {history['val_margin'][-1]:+.3f} | acc val {history['val_accuracy'][-1]:.2f}")

    def on_step(step, loss, lr):
        if step % eval_every == 0 or step == max_steps:
            log(step)

    log(0)
    train_loop(policy, optimizer, endless_batches(train_loader),
               lambda batch: dpo_rewards(policy, reference, batch, device, beta)[0], range(max_steps),
               lr_at=None if max_lr is None else cosine_schedule(max_lr, warmup_steps, max_steps), grad_clip=grad_clip,
               amp=autocast(device, autocast_dtype), seed=seed, on_step=on_step, progress=progress, desc="dpo")
    return history
