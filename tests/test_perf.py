"""shared.perf：FLOPs 公式与 FlopCounterMode、参数量公式、梯度检查点、保存的激活与内存规划器。"""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from shared.model import GPTModel, count_params_formula, model_config, train_flops_per_token
from shared import perf
from shared.generate import generate
from shared.perf import (batch_shape, make_trainer, measure_peak_rss, plan_generation_memory, plan_memory, plan_split, recommend_micro_batch,
                         saved_activation_bytes, set_checkpointing, split_batch, use_fused_ops)
from shared.train import calc_loss_batch, train_loop

SMALL = dict(model_config("tiny"), vocab_size=300, context_length=32, emb_dim=48, n_heads=4, n_layers=3)


@pytest.mark.parametrize("extra", [{}, dict(sdpa=True), dict(qkv_bias=True, tie_weights=False)])
def test_flops_formula_equals_flop_counter(extra):
    cfg = dict(SMALL, **extra)
    with torch.device("meta"):
        model = GPTModel(cfg)
        x = torch.randint(0, cfg["vocab_size"], (2, 32))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert counter.get_total_flops() == train_flops_per_token(cfg, 32) * 2 * 32  # 逐个矩阵乘法数出来，应完全相等


@pytest.mark.parametrize("extra", [{}, dict(qkv_bias=True), dict(tie_weights=False), dict(pad_vocab_to=64)])
def test_count_params_matches_the_model(extra):
    cfg = dict(SMALL, **extra)
    assert count_params_formula(cfg) == sum(p.numel() for p in GPTModel(cfg).parameters())


def test_checkpointing_keeps_results_and_saves_less():
    torch.manual_seed(0)
    plain = GPTModel(SMALL)
    ckpt = set_checkpointing(GPTModel(SMALL), True)
    ckpt.load_state_dict(plain.state_dict())
    assert set(ckpt.state_dict()) == set(plain.state_dict())  # 只换了 forward，参数名不变
    x = torch.randint(0, 300, (2, 32))
    for m in (plain, ckpt):
        F.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)  # 重算的前向与原来逐位等价，容差 1e-6
    assert saved_activation_bytes(ckpt, 2, 32) < 0.7 * saved_activation_bytes(plain, 2, 32)
    set_checkpointing(ckpt, False)
    assert "forward" not in vars(ckpt.trf_blocks[0])


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_activations_match_saved_tensors(sdpa, checkpointing):
    """规划器的“前向保存的激活 + log-softmax 输出”与 saved_tensors_hooks 实测的字节数相差不到 10%。"""
    cfg = dict(model_config("cpu"), sdpa=sdpa, vocab_size=5000)
    model = set_checkpointing(GPTModel(cfg), checkpointing)
    plan = plan_memory(cfg, 2, 128, checkpointing=checkpointing)
    measured = saved_activation_bytes(model, 2, 128)
    assert measured == pytest.approx(plan["activations"] + plan["logits"] / 3, rel=0.10)


def test_plan_parts_and_recommendation():
    gpt2 = model_config("gpt2-small (124M)")
    plan = plan_memory(gpt2, 4, 1024)
    assert plan["weights"] == plan["gradients"] == 4 * 124_439_808 and plan["adam_state"] == 8 * 124_439_808
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    assert plan_memory(dict(gpt2, sdpa=True), 4, 1024)["activations"] < plan["activations"]  # 没有 B·H·T² 项
    assert plan_memory(gpt2, 4, 1024, checkpointing=True)["activations"] < plan["activations"] / 10
    micro, accum, chosen = recommend_micro_batch(dict(gpt2, sdpa=True), 1024, 7 * 2**30, 16)
    assert micro * accum == 16 and chosen["total"] <= 7 * 2**30
    assert plan_memory(dict(gpt2, sdpa=True), 2 * micro, 1024)["total"] > 7 * 2**30  # 再大一倍就放不下
    assert recommend_micro_batch(gpt2, 1024, 2**30, 16) is None  # 1 GiB 连状态都放不下
    assert plan_generation_memory(gpt2, 1, 1024)["kv_cache"] == 2 * 12 * 1024 * 768 * 4


def test_make_trainer_trains():
    ids = torch.randint(0, 300, (2000,))
    run = make_trainer(SMALL, 2, 32, ids, checkpointing=True)
    assert run(2) > 0


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    """gpu 档的 bf16 autocast 路径在 CPU 上也能跑：损失与 fp32 相差在 bf16 的精度之内（约 1%）。"""
    torch.manual_seed(0)
    model = GPTModel(dict(SMALL, sdpa=True, pad_vocab_to=64))
    x = torch.randint(0, 300, (2, 32))
    fp32 = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.01)


@pytest.mark.slow
def test_compiled_model_matches_eager_on_cpu():
    """gpu 档的 torch.compile 路径在 CPU 上编译（需要 C++ 编译器，约一两分钟）：logits 与梯度和急切模式一致。"""
    torch.manual_seed(0)
    model = GPTModel(dict(SMALL, sdpa=True, pad_vocab_to=64))
    compiled = torch.compile(model)
    x = torch.randint(0, 300, (2, 32))
    eager_loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    eager_loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = F.cross_entropy(compiled(x).flatten(0, 1), x.flatten())
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=0)  # 融合后的舍入顺序不同，float32 容差 1e-5
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_use_fused_ops_keeps_the_function_and_the_names():
    """F.layer_norm 与 F.gelu(approximate="tanh") 代替手写的版本：logits 与梯度不变（float32，容差 1e-5），参数名不变。"""
    torch.manual_seed(0)
    plain = GPTModel(dict(SMALL, qkv_bias=True))
    with torch.no_grad():  # LayerNorm 参数默认是 1/0，随机化后才能发现 scale/shift 没有用上
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = use_fused_ops(GPTModel(dict(SMALL, qkv_bias=True)))
    fused.load_state_dict(plain.state_dict())
    assert set(fused.state_dict()) == set(plain.state_dict())
    x = torch.randint(0, 300, (2, 32))
    for m in (plain, fused):
        F.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(generate(fused.eval(), x[:, :3], 5), generate(fused, x[:, :3], 5, use_cache=False))


def test_split_batch_keeps_structure_and_rows():
    x = torch.arange(24).view(4, 6)
    parts = split_batch({"chosen_inputs": x, "chosen_targets": x + 1, "rejected_inputs": x, "rejected_targets": x}, 2)
    assert len(parts) == 2 and torch.equal(parts[1]["chosen_targets"], x[2:] + 1)
    pairs = split_batch((x, x[:, 0]), 4)
    assert [tuple(t.shape) for t in pairs[0]] == [(1, 6), (1,)] and torch.equal(pairs[3][1], x[3:, 0])
    assert batch_shape((x, x)) == (4, 1, 6)                       # (输入, 目标) 是一条序列
    assert batch_shape(parts[0]) == (2, 2, 6)                     # DPO：chosen 与 rejected 是两条
    assert batch_shape((x, torch.zeros(4))) == (4, 1, 6)          # 分类：标签是一维的
    with pytest.raises(ValueError, match="没有 \\(条数, 序列长度\\)"):
        batch_shape((torch.zeros(4, 3),))


def test_plan_split_picks_the_smallest_divisor_that_fits():
    gpt2 = dict(model_config("gpt2-small (124M)"), sdpa=True)
    params = count_params_formula(gpt2)
    batch = (torch.zeros(8, 1024, dtype=torch.long),) * 2
    chunks, plan = plan_split(gpt2, params, batch, budget=7 * 2**30, held=4 * params)
    assert chunks == 4 and plan == plan_memory(gpt2, 2, 1024, params=params)   # 规划器说 2 条放得下、4 条放不下
    assert plan_memory(gpt2, 4, 1024)["total"] > 7 * 2**30
    assert plan_split(gpt2, params, batch, budget=64 * 2**30, held=4 * params)[0] == 1
    other = 2 * 2**30                                             # 显存里另有 2 GiB（例如 DPO 的参考模型）
    assert plan_split(gpt2, params, batch, budget=7 * 2**30, held=4 * params + other)[0] == 8
    with pytest.raises(MemoryError, match="显存不够：每次只算 1 条.*LLM_GPU_MEMORY_GB"):
        plan_split(gpt2, params, batch, budget=3 * 2**30, held=4 * params)


def test_guard_splits_batches_without_changing_the_training(monkeypatch, capsys):
    """假装在一张很小的“GPU”上：守卫把每个 8 条的批次切成几份，训练出来的参数与整批训练相同（容差 1e-5）。"""
    cfg = dict(SMALL, drop_rate=0.0)
    data = torch.randint(0, 300, (64, 33))
    batches = lambda: iter([(data[i:i + 8, :-1], data[i:i + 8, 1:]) for i in range(0, 64, 8)])
    results = []
    for budget in (None, (plan_memory(cfg, 3, 32)["total"], 0)):
        monkeypatch.setattr(perf, "gpu_memory_budget", lambda device, b=budget: b)
        torch.manual_seed(0)
        model = GPTModel(cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # SGD 对梯度的缩放敏感（AdamW 会把它抵消）
        train_loop(model, optimizer, batches(), lambda b: calc_loss_batch(*b, model, "cpu"), range(4),
                   grad_accum_steps=2, grad_clip=None, progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert "批次切成 4 份" in capsys.readouterr().out             # 3 条放得下，8 的约数里最小可行的是 4 份 × 2 条
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    monkeypatch.setattr(perf, "gpu_memory_budget", lambda device: (1000, 0))
    model = GPTModel(cfg)
    with pytest.raises(MemoryError, match="显存不够"):
        train_loop(model, torch.optim.AdamW(model.parameters()), batches(), lambda b: calc_loss_batch(*b, model, "cpu"),
                   range(1), progress=False)


def test_gpu_memory_budget_is_none_off_cuda(monkeypatch):
    monkeypatch.setenv("LLM_GPU_MEMORY_GB", "7")
    assert perf.gpu_memory_budget("cpu") is None and perf.memory_fitter(GPTModel(SMALL)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="峰值常驻内存的清零 (/proc/self/clear_refs) 只有 Linux 有")
@pytest.mark.parametrize("batch, seq_len, checkpointing", [(4, 256, False), (8, 128, True)])
def test_planner_against_measured_peak_rss(batch, seq_len, checkpointing):
    """cpu 档的模型在子进程里训练两步：实测峰值常驻内存比规划多 0%–30%（分配器碎片、线程缓冲区与 Python 运行时）。"""
    cfg = model_config("cpu")
    planned = plan_memory(cfg, batch, seq_len, checkpointing=checkpointing)["total"]
    measured = measure_peak_rss(cfg, batch, seq_len, checkpointing)
    assert 1.0 <= measured / planned <= 1.3, (measured / 2**30, planned / 2**30)
