"""GPT-2 权重与 Hugging Face 格式互转：读取（用 transformers 随机初始化的小 GPT2LMHeadModel 检查 logits 一致）
与导出 export_gpt2_to_hf（transformers 读回后 logits 一致、再读回我们的模型逐位相同）。"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from shared.download import DownloadError  # noqa: E402
from shared.checkpoint import load_weights  # noqa: E402
from shared.gpt2_weights import (convert_hf_gpt2_state, export_gpt2_to_hf, find_gpt2_dir,  # noqa: E402
                                 gpt2_config_from_hf, load_gpt2)
from shared.model import GPTModel, model_config  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)  # float32，同一计算的不同实现


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # 让偏置与 LayerNorm 参数都不是默认值，转置/拆分出错就能被发现
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("gpt2_tiny")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(3))


def test_logits_match_transformers(hf_dir):
    folder, hf_model = hf_dir
    assert any(k.startswith("transformer.") for k in load_file(folder / "model.safetensors"))
    model, cfg = load_gpt2(local_dir=folder)
    assert cfg["emb_dim"] == 48 and cfg["n_layers"] == 2 and cfg["qkv_bias"]
    with torch.no_grad():
        ours = model(IDS)
    torch.testing.assert_close(ours, hf_logits(hf_model, IDS), **TOL)


def test_logits_match_without_transformer_prefix(hf_dir, tmp_path):
    # 官方 openai-community/gpt2 的 model.safetensors 键名不带 "transformer."，还带有注意力掩码缓冲区
    folder, hf_model = hf_dir
    state = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    state.pop("lm_head.weight", None)
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model, _ = load_gpt2(local_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(hf_model, IDS), **TOL)
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()  # 权重共享仍然成立


def test_shape_mismatch_names_the_tensor(hf_dir):
    folder, _ = hf_dir
    hf_config = json.loads((folder / "config.json").read_text())
    cfg = gpt2_config_from_hf(hf_config)
    state = convert_hf_gpt2_state(load_file(folder / "model.safetensors"), cfg)
    wrong = GPTModel(dict(cfg, vocab_size=120))
    with pytest.raises(ValueError, match=r"形状不符 2 个：tok_emb\.weight: 文件 \(101, 48\) / 模型 \(120, 48\), out_head"):
        load_weights(wrong, state)


def test_unsupported_config_raises(hf_dir):
    folder, _ = hf_dir
    hf_config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="activation_function"):
        gpt2_config_from_hf(dict(hf_config, activation_function="relu"))


def test_missing_files_raise_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path / "mirror"))
    assert find_gpt2_dir("gpt2") is None
    with pytest.raises(DownloadError, match="openai-community/gpt2"):
        load_gpt2("gpt2", allow_download=False)
    with pytest.raises(DownloadError, match="镜像中没有这个文件"):  # 设置了镜像就不联网：镜像里没有文件 -> 清楚的错误
        load_gpt2("gpt2", allow_download=True)


def test_finds_files_in_hf_cache_layout(hf_dir, tmp_path, monkeypatch):
    folder, _ = hf_dir
    snap = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "hub" / "models--openai-community--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--openai-community--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_gpt2_dir("gpt2") == snap


@pytest.mark.parametrize("overrides", [dict(), dict(tie_weights=False, qkv_bias=True), dict(drop_rate=0.1)],
                         ids=["course-config", "untied-with-bias", "dropout"])
def test_export_round_trip(tmp_path, overrides):
    """GPTModel -> export_gpt2_to_hf -> transformers 读回：logits 在 float32 舍入误差内一致；
    再用 load_gpt2 读回我们的模型：每个张量逐位相同（课程的 tiny 配置没有 QKV 偏置，导出的是全零偏置）。"""
    torch.manual_seed(0)
    cfg = dict(model_config("tiny"), vocab_size=101, context_length=32, **overrides)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # 偏置与 LayerNorm 参数默认是 0/1，随机化后转置或拆分出错才能被发现
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = export_gpt2_to_hf(torch.compile(model), tmp_path / "hf")  # 编译过的模型导出的也是原模型
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf_model.config.tie_word_embeddings == cfg.get("tie_weights", True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(hf_model, IDS), **TOL)
    back, back_cfg = load_gpt2(local_dir=folder)
    assert back_cfg["tie_weights"] == cfg.get("tie_weights", True)
    ours, theirs = model.state_dict(), back.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    assert all(not theirs[n].any() for n in theirs if n not in ours)  # 多出来的只有全零的 QKV 偏置


def test_export_drops_padded_vocab_rows(tmp_path):
    """gpu 档的提速开关（SDPA、词表补齐到 64 的倍数）不改变导出结果：补齐的行被去掉，transformers 的 logits 一致。"""
    torch.manual_seed(0)
    model = GPTModel(dict(model_config("tiny"), vocab_size=101, context_length=32, sdpa=True, pad_vocab_to=64)).eval()
    assert model.tok_emb.weight.shape[0] == 128
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(export_gpt2_to_hf(model, tmp_path / "hf")).eval()
    assert hf_model.config.vocab_size == 101 and hf_model.transformer.wte.weight.shape == (101, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(hf_model, IDS), **TOL)
