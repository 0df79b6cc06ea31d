"""第 5 章的训练工具：损失、优化器分组、学习率调度、train_step / train_loop、检查点、load_weights 与断点续训。"""
import math

import pytest
import torch
from safetensors import safe_open

from shared.checkpoint import (ch05_checkpoint_path, load_checkpoint, load_model, load_weights, read_checkpoint_metadata,
                               save_checkpoint)
from shared.model import GPTModel, model_config
from shared.train import (EpochShuffleSampler, calc_loss_batch, calc_loss_loader, configure_optimizer, cosine_lr,
                          cosine_schedule, endless_batches, evaluate, sample_batches, token_loader, train_loop,
                          train_model, train_step)

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


def test_masked_targets_skip_the_output_layer_on_ignored_positions():
    model, _ = fresh()
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs.get("keep")), with_kwargs=True)
    x, y = IDS[:32].view(2, 16), IDS[1:33].view(2, 16).clone()
    calc_loss_batch(x, y, model, "cpu")
    assert seen[-1] is None  # 没有被屏蔽的目标：整段计算
    y[:, :5] = -100
    calc_loss_batch(x, y, model, "cpu")
    assert torch.equal(seen[-1], y != -100)  # 只在回答位置算输出层


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
    with pytest.raises(ValueError, match=r"warmup_steps \(20\) <= total_steps \(10\)"):
        cosine_lr(0, 1.0, 0.1, warmup_steps=20, total_steps=10)
    lr_at = cosine_schedule(1.0, 10, 110)  # min_lr 默认为 max_lr / 10
    assert [lr_at(s) for s in (0, 9, 60, 200)] == pytest.approx([0.1, 1.0, 0.55, 0.1])
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 20, 10)


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
    resumed = train_model(model, train, val, opt, "cpu", resume=info, **kw)
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
    with pytest.raises(ValueError, match=r"形状不符 1 个：pos_emb\.weight: 文件 \(16, 64\) / 模型 \(32, 64\)"):
        load_checkpoint(path, wrong)


def test_optimizer_from_another_save_is_rejected(tmp_path):
    model, opt = fresh()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, opt, step=1)
    save_checkpoint(path.with_name("other.safetensors"), model, opt, step=2)
    path.with_name("other.optim.pt").replace(path.with_suffix(".optim.pt"))
    with pytest.raises(ValueError, match=r"优化器状态（step 2）与权重（step 1）不是同一次保存的"):
        load_checkpoint(path, model, opt)


def test_load_model_rebuilds_from_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("LLM_PROFILE", "tiny")
    assert ch05_checkpoint_path() == tmp_path / "ch05_gpt_tiny.safetensors"  # 配置档在调用时读取
    with pytest.raises(FileNotFoundError, match="ch05_gpt_tiny.safetensors"):
        load_model(ch05_checkpoint_path())
    model, _ = fresh()
    save_checkpoint(ch05_checkpoint_path(), model, step=10)
    loaded = load_model(ch05_checkpoint_path())
    assert loaded.cfg == CFG and not loaded.training
    x = IDS[:16][None]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    bare = tmp_path / "no_config.safetensors"
    save_checkpoint(bare, torch.nn.Linear(2, 2))  # 没有 cfg 的模块：元数据里没有模型配置
    with pytest.raises(ValueError, match="元数据里没有模型配置"):
        load_model(bare)


def test_saving_a_compiled_model_writes_plain_names(tmp_path):
    model, opt = fresh()
    compiled = torch.compile(model)  # 只包装、不真正编译（编译在第一次前向时才发生）
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, compiled, opt, step=1)
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.startswith("_orig_mod.") for k in f.keys())
    assert read_checkpoint_metadata(path)["config"] == CFG
    other, other_opt = fresh(seed=1)
    load_checkpoint(path, torch.compile(other), other_opt)  # 读进编译过的模型也可以
    assert torch.equal(other.tok_emb.weight, model.tok_emb.weight)


def test_load_weights_reports_every_problem_by_name():
    model, _ = fresh()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("final_norm.scale")
    state["extra.weight"] = torch.zeros(3)
    state["pos_emb.weight"] = torch.zeros(8, 64)
    with pytest.raises(ValueError, match=r"缺少 1 个：final_norm\.scale；多出 1 个：extra\.weight；"
                                         r"形状不符 1 个：pos_emb\.weight: 文件 \(8, 64\) / 模型 \(16, 64\)"):
        load_weights(model, state)


@pytest.mark.parametrize("assign", [False, True])
def test_load_weights_keeps_tied_weights_tied(assign):
    source, _ = fresh(seed=3)
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "tok_emb.weight"}  # 只给共享的另一个名字
    if assign:
        with torch.device("meta"):
            model = GPTModel(CFG)
    else:
        model, _ = fresh()
    load_weights(model, state, assign=assign)
    assert model.out_head.weight is model.tok_emb.weight
    assert torch.equal(model.tok_emb.weight, source.tok_emb.weight)
    assert not any(p.is_meta for p in model.parameters())
    state["tok_emb.weight"] = state["out_head.weight"] + 1  # 共享的两个名字给了不同的值：报错，而不是随便挑一个
    with pytest.raises(ValueError, match="共享权重，文件里却不相同"):
        load_weights(fresh()[0], state)


def test_train_step_accumulation_equals_one_big_batch():
    """两个各 2 条的微批次做梯度累积，与一个 4 条的批次相比：更新后的参数在 float32 舍入误差内相同。"""
    x = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(6))
    models = []
    for batches, accum in ([(x, y)], 1), ([(x[:2], y[:2]), (x[2:], y[2:])], 2):
        model, opt = fresh()
        loss = train_step(model, opt, iter(batches), lambda b, m=model: calc_loss_batch(*b, m, "cpu"),
                          grad_accum_steps=accum, grad_clip=None)
        models.append((model, loss))
    (big, big_loss), (acc, acc_loss) = models
    assert acc_loss == pytest.approx(big_loss, abs=1e-5)
    for (n, p), q in zip(big.named_parameters(), acc.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_train_step_clips_the_gradient_norm():
    model, opt = fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # 学习率 0：只看梯度
    x, y = IDS[:32].view(2, 16), IDS[1:33].view(2, 16)
    train_step(model, opt, iter([(x, y)]), lambda b: 1000 * calc_loss_batch(*b, model, "cpu"), grad_clip=0.5)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)


def test_train_loop_sets_lr_seeds_each_step_and_calls_the_hook():
    model, opt = fresh()
    train, _ = loaders()
    seen, draws = [], []

    def loss_fn(batch):
        draws.append(torch.rand(1).item())  # 每步开始前重设了 seed + step：随机数只取决于步号
        return calc_loss_batch(*batch, model, "cpu")

    lr_at = cosine_schedule(1e-3, 2, 6)
    train_loop(model, opt, endless_batches(train), loss_fn, range(2, 5), lr_at=lr_at, seed=11,
               on_step=lambda step, loss, lr: seen.append((step, lr)), progress=False)
    assert seen == [(3, lr_at(2)), (4, lr_at(3)), (5, lr_at(4))]
    expected = []
    for step in range(2, 5):
        torch.manual_seed(11 + step)
        expected.append(torch.rand(1).item())
    # 第一步取批次时 DataLoader 新建迭代器，会从全局随机数里取一个种子，所以第一步之后的随机数才与手算的一致
    assert draws[1:] == expected[1:]
    assert all(p.grad is None for p in model.parameters())  # 训练结束时释放了梯度，留下的模型不多占内存


def test_evaluate_restores_the_training_mode():
    model, _ = fresh()
    train, val = loaders()
    model.train()
    evaluate(model, sample_batches(train, 1), sample_batches(val, 1), "cpu")
    assert model.training
    model.eval()
    evaluate(model, train, val, "cpu")
    assert not model.training


def test_sample_batches_draws_random_windows_without_replacement():
    train = token_loader(torch.arange(400), batch_size=4, max_length=16, stride=8, shuffle=True, seed=1)
    _, val = loaders()
    batches = sample_batches(train, 3, seed=5)
    assert len(batches) == 3 and all(x.shape == y.shape == (4, 16) for x, y in batches)
    picked = [int(x[0]) // 8 for batch in batches for x in batch[0]]  # 第 k 个窗口从 token 8k 开始
    assert len(set(picked)) == 12  # 不放回：12 个不同的窗口
    assert max(picked) >= 12  # 不是前 3 个批次：抽到的窗口散布在整个数据集里（共 48 个窗口）
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, sample_batches(train, 3, seed=5)))  # 固定种子
    assert not torch.equal(batches[0][0], sample_batches(train, 3, seed=6)[0][0])
    assert sample_batches(val, None) is val and sample_batches(val, 100) is val  # 要的比全部还多：就用全部


@pytest.mark.parametrize("fp32, bf16, expected", [(100.0, 500.0, torch.bfloat16), (100.0, 110.0, None),
                                                  (100.0, 30.0, None)])
def test_pick_autocast_dtype_uses_bf16_only_when_clearly_faster(monkeypatch, capsys, fp32, bf16, expected):
    import shared.train as train
    monkeypatch.setattr(train, "matmul_gflops", lambda dtype, device="cpu": bf16 if dtype == torch.bfloat16 else fp32)
    assert train.pick_autocast_dtype("cpu", rounds=2) is expected
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and ("用 bf16 autocast" if expected else "保持 fp32") in out
