"""Hugging Face safetensors 检查点的读取：单文件与分片、meta 设备上的逐个张量赋值、清楚的错误信息、本地查找。"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shared.hf_checkpoint import find_hf_checkpoint, load_hf_weights, safetensors_index  # noqa: E402
from shared.llama import Llama3Model, hf_to_llama_name, llama_config_from_hf, load_llama  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """同一个小随机 LlamaForCausalLM（不共享输出层、GQA、Llama 3 RoPE 缩放），保存成单文件与分片两份。"""
    config = transformers.LlamaConfig(
        vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    root = tmp_path_factory.mktemp("hf_ckpt")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="10KB")
    return root / "single", root / "sharded"


def test_index_single_and_sharded(folders):
    single, sharded = folders
    a, b = safetensors_index(single), safetensors_index(sharded)
    assert set(a) == set(b) and "lm_head.weight" in a
    assert {p.name for p in a.values()} == {"model.safetensors"}
    assert len(set(b.values())) > 1 and (sharded / "model.safetensors.index.json").is_file()


def test_sharded_equals_single_exactly(folders):
    single, sharded = folders
    m1, _ = load_llama(single)
    m2, _ = load_llama(sharded)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    ids = torch.randint(0, 89, (1, 12))
    with torch.no_grad():
        assert torch.equal(m1(ids), m2(ids))


def test_meta_model_is_fully_materialised(folders):
    model, cfg = load_llama(folders[0])
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert model.cos.shape == (cfg["context_length"], cfg["head_dim"])
    assert not model.training


def test_dtype_conversion(folders):
    model, cfg = load_llama(folders[1], dtype=torch.bfloat16)
    assert cfg["dtype"] == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16


def test_missing_tensor_names_it(folders, edited_checkpoint):
    folder = edited_checkpoint(folders[0], lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"缺少.*trf_blocks\.1\.ff\.fc2\.weight"):
        load_llama(folder)


def test_misshaped_tensor_names_it_with_both_shapes(folders, edited_checkpoint):
    name = "model.layers.0.self_attn.k_proj.weight"
    folder = edited_checkpoint(folders[0], lambda s: s.update({name: torch.zeros(24, 32)}))
    with pytest.raises(ValueError, match=r"W_key\.weight（文件里的 model\.layers\.0\.self_attn\.k_proj\.weight）: "
                                         r"文件 \(24, 32\) / 模型 \(16, 32\)"):
        load_llama(folder)


def test_unexpected_tensor_names_it(folders, edited_checkpoint):
    folder = edited_checkpoint(folders[0], lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"多出 1 个：model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_llama(folder)


def test_tied_checkpoint_with_redundant_lm_head(folders, edited_checkpoint):
    # 有些共享权重的检查点仍然存了 lm_head.weight：它被忽略，out_head 指向 tok_emb
    folder = edited_checkpoint(folders[0], lambda s: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    model, cfg = load_llama(folder)
    assert cfg["tie_embeddings"]
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_generic_loader_with_custom_rename(folders):
    # load_hf_weights 本身不认识 Llama：名字对应关系由调用者给出，rename 返回 None 的张量被跳过
    single = folders[0]
    cfg = dict(llama_config_from_hf(json.loads((single / "config.json").read_text())), dtype=torch.float32)
    with torch.device("meta"):
        model = Llama3Model(cfg)
    seen = []

    def rename(name):
        seen.append(name)
        return hf_to_llama_name(name)

    load_hf_weights(model, single, rename)
    assert len(seen) == len(safetensors_index(single))
    with torch.device("meta"):
        model = Llama3Model(cfg)
    with pytest.raises(ValueError, match=r"缺少 5 个：trf_blocks\.0\.norm1\.weight"):  # 2 层 × 2 个 + final_norm
        load_hf_weights(model, single, lambda n: None if "norm" in n else hf_to_llama_name(n))


def test_old_style_rope_config():
    new = dict(vocab_size=10, max_position_embeddings=16, hidden_size=8, num_attention_heads=2,
               num_hidden_layers=1, intermediate_size=12,
               rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=4.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8))
    old = dict(new, rope_theta=5e5, rope_scaling=dict(type="llama3", factor=4.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=8))
    del old["rope_parameters"]
    assert llama_config_from_hf(new) == llama_config_from_hf(old)
    plain = dict(new, rope_parameters=None, rope_theta=1e4)
    assert llama_config_from_hf(plain)["rope_freq"] is None and llama_config_from_hf(plain)["rope_base"] == 1e4
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        llama_config_from_hf(dict(new, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)))
    with pytest.raises(ValueError, match="attention_bias"):
        llama_config_from_hf(dict(new, attention_bias=True))


def test_no_checkpoint_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*model\.safetensors\.index\.json"):
        safetensors_index(tmp_path)


def test_find_checkpoint_in_local_dir_hf_cache_and_mirror(folders, tmp_path, monkeypatch):
    single = folders[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path / "mirror"))
    repo = "meta-llama/Llama-3.2-1B"
    assert find_hf_checkpoint(repo) is None
    assert find_hf_checkpoint(repo, local_dir=single) == single

    mirror = tmp_path / "mirror" / "huggingface.co" / repo / "resolve" / "main"
    mirror.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (mirror / name).write_bytes((single / name).read_bytes())
    assert find_hf_checkpoint(repo) == mirror

    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((single / name).read_bytes())
    assert find_hf_checkpoint(repo) == snap  # HF 缓存排在镜像前面
