"""训练记录与诊断：TensorBoard 记录器写出并能读回预期的标签；更新比例与手算一致；损失变成 NaN 时训练循环在更新参数之前
停下并写明步号；不传 monitor 时训练循环不额外计算梯度范数。"""
import math

import pytest
import torch
import torch.nn as nn

pytest.importorskip("tensorboard")

from shared.model import GPTModel, model_config  # noqa: E402
from shared.monitor import TensorBoardMonitor, param_group, read_scalars, read_texts, update_ratios  # noqa: E402
from shared.train import IGNORE_INDEX, calc_loss_batch, configure_optimizer, train_loop, train_model, train_step  # noqa: E402,E501
from shared.train import token_loader  # noqa: E402

CFG = dict(model_config("tiny"), vocab_size=50, context_length=16)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG)


def loaders():
    ids = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(0))
    return token_loader(ids[:1600], 4, 16, 16, seed=0), token_loader(ids[1600:], 4, 16, 16, shuffle=False)


def test_logger_writes_the_expected_tags(tmp_path):
    model = tiny_gpt()
    train_loader, val_loader = loaders()
    with TensorBoardMonitor(tmp_path, tokens_per_step=64, ratio_every=2, sample_fn=lambda m: "sample text",
                            sample_every=3) as monitor:
        history = train_model(model, train_loader, val_loader, configure_optimizer(model, lr=1e-3), "cpu",
                              max_steps=6, eval_every=3, eval_batches=2, max_lr=1e-3, warmup_steps=2, monitor=monitor,
                              progress=False)
    scalars = read_scalars(tmp_path)
    expected = {"train/loss", "train/lr", "train/grad_norm", "speed/tokens_per_s", "eval/train_loss", "eval/val_loss"}
    expected |= {f"update_ratio/{g}" for g in ("embedding", "attention", "mlp", "norm")}  # 输出层与词嵌入共享
    assert set(scalars) == expected
    assert scalars["train/loss"].step.tolist() == [1, 2, 3, 4, 5, 6]
    assert scalars["update_ratio/mlp"].step.tolist() == [1, 3, 5]       # 每 2 个更新算一次
    assert scalars["eval/val_loss"].value.tolist() == pytest.approx(history["val_loss"], abs=1e-6)
    assert scalars["train/lr"].value.tolist() == pytest.approx([5e-4, 1e-3, *scalars["train/lr"].value[2:]], abs=1e-9)
    assert read_texts(tmp_path) == {3: "sample text", 6: "sample text"}


def test_grad_norm_is_the_norm_before_clipping(tmp_path):
    model = tiny_gpt()
    batch = next(iter(loaders()[0]))
    model.zero_grad()
    calc_loss_batch(*batch, model, "cpu").backward()
    expected = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    model.zero_grad()
    with TensorBoardMonitor(tmp_path) as monitor:
        train_step(model, configure_optimizer(model, lr=1e-3), iter([batch]), lambda b: calc_loss_batch(*b, model, "cpu"),
                   grad_clip=1e-3, monitor=monitor)
        assert monitor.grad_norm == pytest.approx(expected, rel=1e-5) and expected > 1e-3


def test_update_ratio_matches_a_hand_calculation():
    before = {"trf_blocks.0.att.W_query.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]]),  # 范数 5
              "trf_blocks.0.ff.layers.0.weight": torch.tensor([1.0, 0.0]),
              "trf_blocks.0.ff.layers.0.bias": torch.tensor([0.0])}
    after = {"trf_blocks.0.att.W_query.weight": torch.tensor([[3.0, 0.5], [0.0, 4.0]]),
             "trf_blocks.0.ff.layers.0.weight": torch.tensor([1.0, 0.3]),
             "trf_blocks.0.ff.layers.0.bias": torch.tensor([0.4])}
    ratios = update_ratios(before, after)
    assert ratios["attention"] == pytest.approx(0.5 / 5.0)
    assert ratios["mlp"] == pytest.approx(math.sqrt(0.3**2 + 0.4**2) / 1.0)  # 组内拼成一个向量


def test_param_groups_of_gpt():
    names = {n: param_group(n) for n, _ in tiny_gpt().named_parameters()}
    assert names["tok_emb.weight"] == "embedding" and names["trf_blocks.0.att.W_query.weight"] == "attention"
    assert names["trf_blocks.1.ff.layers.2.weight"] == "mlp" and names["final_norm.scale"] == "norm"
    assert param_group("_orig_mod.out_head.weight") == "head"  # torch.compile 包装后的名字


def test_nan_loss_stops_before_the_update_and_names_the_step():
    model = tiny_gpt()
    good = list(loaders()[0])[:3]
    bad = (good[0][0], torch.full_like(good[0][1], IGNORE_INDEX))  # 没有要计分的目标：平均损失是 0/0
    snapshot = None

    def remember(step, loss, lr):
        nonlocal snapshot
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match=r"第 3 步：训练损失是 nan，参数没有更新"):
        train_loop(model, configure_optimizer(model, lr=1e-3), iter(good[:2] + [bad]),
                   lambda b: calc_loss_batch(*b, model, "cpu"), range(3), on_step=remember, progress=False)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items()), "NaN 的一步不能改动参数"


def test_no_monitor_and_no_clipping_computes_no_grad_norm(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("不裁剪、也没有 monitor 时不应计算梯度范数")
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", forbidden)
    model = tiny_gpt()
    batch = next(iter(loaders()[0]))
    train_step(model, configure_optimizer(model, lr=1e-3), iter([batch]), lambda b: calc_loss_batch(*b, model, "cpu"),
               grad_clip=None)
