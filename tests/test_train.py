"""第 5 章的训练工具：损失、优化器分组、学习率调度、检查点与断点续训。"""
import math

import pytest
import torch

from shared.model import GPTModel, model_config
from shared.train import (EpochShuffleSampler, calc_loss_batch, calc_loss_loader, ch05_checkpoint_path,
                          configure_optimizer, cosine_lr, load_ch05_model, load_checkpoint, save_checkpoint,
                          token_loader, train_model)

CFG = dict(model_config("tiny"), vocab_size=101, context_length=16)
IDS = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0))


def fresh(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    return model, configure_optimizer(model, lr=1e-3)


def loaders():
    train = token_loader(IDS[:2400], batch_size=4, max_length=16, stride=8, shuffle=True, seed=1)
    val = token_loader(IDS[2400:], batch_size=4, max_length=16, stride=16, shuffle=False, drop_last=False)
    return train, val


def test_loss_is_mean_negative_log_probability_and_respects_ignore_index():
    model, _ = fresh()
    x, y = IDS[:32].view(2, 16), IDS[1:33].view(2, 16).clone()
    logp = torch.log_softmax(model(x), dim=-1)
    manual = -logp.gather(-1, y[..., None]).mean()
    assert calc_loss_batch(x, y, model, "cpu").item() == pytest.approx(manual.item(), abs=1e-5)
    y[:, :5] = -100  # 被屏蔽的位置不计入平均
    masked = -logp[:, 5:].gather(-1, y[:, 5:, None]).mean()
    assert calc_loss_batch(x, y, model, "cpu").item() == pytest.approx(masked.item(), abs=1e-5)


def test_calc_loss_loader_averages_batches():
    model, _ = fresh()
    _, val = loaders()
    batches = [calc_loss_batch(x, y, model, "cpu").item() for x, y in val]
    assert calc_loss_loader(val, model, "cpu") == pytest.approx(sum(batches) / len(batches), abs=1e-6)
    assert calc_loss_loader(val, model, "cpu", num_batches=2) == pytest.approx(sum(batches[:2]) / 2, abs=1e-6)


def test_weight_decay_only_on_matrices():
    model, opt = fresh()
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # 共享的输出层只出现一次


def test_cosine_schedule_known_values():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert cosine_lr(0, **kw) == pytest.approx(0.1)        # 预热第 1 步：1/10
    assert cosine_lr(9, **kw) == pytest.approx(1.0)        # 预热结束
    assert cosine_lr(10, **kw) == pytest.approx(1.0)       # 余弦起点
    assert cosine_lr(60, **kw) == pytest.approx(0.55)      # 一半：(max+min)/2
    assert cosine_lr(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(110, **kw) == pytest.approx(0.1) and cosine_lr(500, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        cosine_lr(0, 1.0, 0.1, warmup_steps=20, total_steps=10)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(99)  # 全局随机状态不影响顺序
    assert list(b) == first and sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first


def test_resume_from_checkpoint_gives_identical_losses(tmp_path):
    train, val = loaders()
    kw = dict(max_steps=12, eval_every=3, eval_batches=2, max_lr=5e-3, warmup_steps=2, grad_accum_steps=2,
              seed=7, progress=False)
    model, opt = fresh()
    full = train_model(model, train, val, opt, "cpu", **kw)

    model, opt = fresh()
    path = tmp_path / "run.safetensors"
    train_model(model, train, val, opt, "cpu", checkpoint_path=path, checkpoint_every=5, stop_step=5, **kw)
    model, opt = fresh(seed=42)  # 不同的初始权重：全部状态都必须来自检查点
    info = load_checkpoint(path, model, opt)
    assert info["step"] == 5
    resumed = train_model(model, train, val, opt, "cpu", start_step=info["step"],
                          tokens_seen=info["extra"]["tokens_seen"], history=info["extra"]["history"], **kw)
    for key in ("step", "tokens_seen", "lr", "train_loss", "val_loss"):
        assert resumed[key] == full[key], key  # 逐位相等（CPU 上确定性的计算），不是近似


def test_checkpoint_round_trip_with_tied_weights_and_config(tmp_path):
    model, opt = fresh()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, opt, step=3, extra={"note": "x"})
    other, other_opt = fresh(seed=1)
    info = load_checkpoint(path, other, other_opt)
    assert info == {"step": 3, "config": CFG, "extra": {"note": "x"}}
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    assert other.out_head.weight.data_ptr() == other.tok_emb.weight.data_ptr()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*tmp"))  # 原子写入不留临时文件


def test_shape_mismatch_raises_naming_the_tensor(tmp_path):
    model, _ = fresh()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    wrong, _ = fresh(cfg=dict(CFG, context_length=32))
    with pytest.raises(ValueError, match="pos_emb.weight"):
        load_checkpoint(path, wrong)


def test_optimizer_from_another_save_is_rejected(tmp_path):
    model, opt = fresh()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, opt, step=1)
    save_checkpoint(path.with_name("other.safetensors"), model, opt, step=2)
    path.with_name("other.optim.pt").replace(path.with_suffix(".optim.pt"))
    with pytest.raises(ValueError, match="step"):
        load_checkpoint(path, model, opt)


def test_load_ch05_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path))
    assert load_ch05_model("tiny") is None
    model, _ = fresh()
    save_checkpoint(ch05_checkpoint_path("tiny"), model, step=10)
    assert ch05_checkpoint_path("tiny") == tmp_path / "ch05_gpt_tiny.safetensors"
    loaded, cfg = load_ch05_model("tiny")
    assert cfg == CFG and not loaded.training
    x = IDS[:16][None]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
