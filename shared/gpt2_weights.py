"""GPT-2 权重与 Hugging Face 格式互转：读取真实的 GPT-2 权重到本课程的 GPTModel，
以及把 GPTModel 导出成 transformers 能读的目录，在 05_pretraining 中讲解。"""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import load_weights
from .download import DownloadError, cache_dir, download, mirror_dir, url_to_relpath
from .model import GPTModel
from .runtime import ALLOW_DOWNLOAD_ENV, HF_ENDPOINT_ENV, MIRROR_ENV, atomic_write, download_allowed

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/01_pretraining.ipynb ----
GPT2_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}  # 简称 -> 仓库
GPT2_FILES = ("config.json", "model.safetensors")


def hf_url(repo, filename):
    return f"https://huggingface.co/{repo}/resolve/main/{filename}"


def _hf_cache_snapshots(repo):
    """Hugging Face 缓存里这个仓库的快照目录（refs/main 指向的优先）。"""
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    root = Path(hub).expanduser() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    snapshots = [root / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    return snapshots + sorted((root / "snapshots").glob("*"))


def find_hf_dir(repo, is_complete, local_dir=None):
    """按顺序在 local_dir、HF 缓存、LLM_MIRROR 镜像、下载缓存中找 Hugging Face 仓库 repo 的文件目录，
    返回第一个 is_complete(目录) 为真的目录；找不到返回 None。"""
    candidates = [Path(local_dir).expanduser()] if local_dir else []
    candidates += _hf_cache_snapshots(repo) + _hf_cache_snapshots(repo.split("/")[-1])
    relative = url_to_relpath(hf_url(repo, "config.json")).parent
    candidates += [root / relative for root in (mirror_dir(), cache_dir()) if root is not None]
    return next((c for c in candidates if is_complete(c)), None)


def find_gpt2_dir(name="gpt2", local_dir=None):
    """在本地找含 config.json 与 model.safetensors 的 GPT-2 目录（查找顺序见 find_hf_dir）。找不到返回 None。"""
    return find_hf_dir(GPT2_REPOS.get(name, name), lambda d: all((d / f).is_file() for f in GPT2_FILES), local_dir)


def fetch_gpt2(name="gpt2", local_dir=None, allow_download=None):
    """返回 GPT-2 文件所在目录；本地没有、且允许下载时用下载助手获取（124M 约 0.5 GB，带进度条）。
    allow_download=None 表示看环境变量 LLM_ALLOW_DOWNLOAD（=1 时允许）。拿不到时抛出 DownloadError，说明原因和办法。"""
    if (found := find_gpt2_dir(name, local_dir)) is not None:
        return found
    repo = GPT2_REPOS.get(name, name)
    if not (download_allowed() if allow_download is None else allow_download):
        raise DownloadError(f"本地没有 {repo} 的 {' 与 '.join(GPT2_FILES)}（查找了 local_dir、Hugging Face 缓存、"
                            f"{MIRROR_ENV} 镜像与下载缓存），也没有允许下载。设置 {ALLOW_DOWNLOAD_ENV}=1 即可自动下载"
                            f"（约 0.5 GB；国内网络可同时设置 {HF_ENDPOINT_ENV}=https://hf-mirror.com）")
    paths = [download(hf_url(repo, f), timeout=60) for f in GPT2_FILES]
    return paths[0].parent


def gpt2_config_from_hf(hf_config):
    """把 Hugging Face 的 GPT-2 config.json（字典）换成本课程 GPTModel 的配置；遇到不支持的设置直接报错。"""
    for key, expected in [("activation_function", "gelu_new"), ("layer_norm_epsilon", 1e-5),
                          ("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)]:
        if hf_config.get(key, expected) != expected:
            raise ValueError(f"不支持的 GPT-2 设置 {key}={hf_config[key]!r}（本课程的 GPTModel 对应 {expected!r}）")
    return dict(vocab_size=hf_config["vocab_size"], context_length=hf_config["n_positions"],
                emb_dim=hf_config["n_embd"], n_layers=hf_config["n_layer"], n_heads=hf_config["n_head"],
                drop_rate=0.0, qkv_bias=True, tie_weights=hf_config.get("tie_word_embeddings", True))


GPT2_NAMES = [  # (本课程 GPTModel 的名字, HF GPT-2 的名字, 是否转置)；{i} 是层号。c_attn 另行拆分/拼接
    ("tok_emb.weight", "wte.weight", False), ("pos_emb.weight", "wpe.weight", False),
    ("final_norm.scale", "ln_f.weight", False), ("final_norm.shift", "ln_f.bias", False),
    ("trf_blocks.{i}.att.out_proj.weight", "h.{i}.attn.c_proj.weight", True),
    ("trf_blocks.{i}.att.out_proj.bias", "h.{i}.attn.c_proj.bias", False),
    ("trf_blocks.{i}.ff.layers.0.weight", "h.{i}.mlp.c_fc.weight", True),
    ("trf_blocks.{i}.ff.layers.0.bias", "h.{i}.mlp.c_fc.bias", False),
    ("trf_blocks.{i}.ff.layers.2.weight", "h.{i}.mlp.c_proj.weight", True),
    ("trf_blocks.{i}.ff.layers.2.bias", "h.{i}.mlp.c_proj.bias", False),
    ("trf_blocks.{i}.norm1.scale", "h.{i}.ln_1.weight", False), ("trf_blocks.{i}.norm1.shift", "h.{i}.ln_1.bias", False),
    ("trf_blocks.{i}.norm2.scale", "h.{i}.ln_2.weight", False), ("trf_blocks.{i}.norm2.shift", "h.{i}.ln_2.bias", False),
]


def gpt2_name_pairs(n_layers):
    """逐个给出 (我们的名字, HF 的名字, 是否转置)，按层展开 GPT2_NAMES。"""
    for ours, hf, transpose in GPT2_NAMES:
        for i in range(n_layers) if "{i}" in ours else [None]:
            yield ours.format(i=i), hf.format(i=i), transpose


def convert_hf_gpt2_state(hf_state, cfg):
    """Hugging Face GPT-2 的张量字典 -> 本课程 GPTModel 的 state_dict。
    - 键名可以带或不带 "transformer." 前缀；注意力掩码缓冲区 (attn.bias / attn.masked_bias) 被忽略；
    - HF 的 Conv1D 权重形状是 (输入, 输出)，nn.Linear 是 (输出, 输入)，所以要转置；
    - c_attn 把 Q、K、V 拼在一起，拆成 W_query、W_key、W_value；
    - 没有 lm_head.weight 时（权重共享）输出层就用词嵌入。"""
    hf = {k.removeprefix("transformer."): v for k, v in hf_state.items()}

    def take(key):
        if key not in hf:
            raise KeyError(f"GPT-2 检查点缺少张量 {key!r}（不是 GPT-2 格式？）")
        return hf[key]

    state = {ours: take(name).T if transpose else take(name) for ours, name, transpose in gpt2_name_pairs(cfg["n_layers"])}
    for i in range(cfg["n_layers"]):
        att = f"trf_blocks.{i}.att."
        qkv_weight, qkv_bias = take(f"h.{i}.attn.c_attn.weight").T.chunk(3, dim=0), take(f"h.{i}.attn.c_attn.bias").chunk(3)
        for name, weight, bias in zip(("W_query", "W_key", "W_value"), qkv_weight, qkv_bias):
            state[f"{att}{name}.weight"], state[f"{att}{name}.bias"] = weight, bias
    state["out_head.weight"] = hf.get("lm_head.weight", state["tok_emb.weight"])
    return state


def export_gpt2_to_hf(model, folder):
    """convert_hf_gpt2_state 的逆过程：把 GPTModel 存成 save_pretrained 布局的 GPT2LMHeadModel 目录（config.json +
    model.safetensors），from_pretrained 与 load_gpt2 都能读回。课程的 tiny/cpu 配置没有 QKV 偏置，GPT-2 却总有，
    所以写入全零偏置，计算结果不变。返回 folder。"""
    from transformers import GPT2Config
    model = getattr(model, "_orig_mod", model)
    cfg, own = model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for key in ("tok_emb.weight", "out_head.weight"):  # 补齐的词表行（第 4 章的提速开关）从不被用到，导出时去掉
        own[key] = own[key][:cfg["vocab_size"]]
    hf = {f"transformer.{name}": own[ours].T if transpose else own[ours]
          for ours, name, transpose in gpt2_name_pairs(cfg["n_layers"])}
    for i in range(cfg["n_layers"]):
        att = [f"trf_blocks.{i}.att.{name}" for name in ("W_query", "W_key", "W_value")]
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([own[a + ".weight"] for a in att]).T
        hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
            [own.get(a + ".bias", torch.zeros(cfg["emb_dim"])) for a in att])
    tied = model.out_head.weight is model.tok_emb.weight
    if not tied:
        hf["lm_head.weight"] = own["out_head.weight"]
    config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
                        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], activation_function="gelu_new",
                        resid_pdrop=cfg["drop_rate"], embd_pdrop=cfg["drop_rate"], attn_pdrop=cfg["drop_rate"],
                        layer_norm_epsilon=1e-5, tie_word_embeddings=tied, architectures=["GPT2LMHeadModel"])
    folder = Path(folder)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(config.to_json_string(), encoding="utf-8"))
    tensors = {k: v.contiguous() for k, v in hf.items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return folder


def load_gpt2(name="gpt2", local_dir=None, allow_download=None, device="cpu"):
    """读取真实的 GPT-2 权重，返回 (GPTModel, cfg)，模型处于 eval 模式。查找与下载规则见 fetch_gpt2；拿不到时抛出 DownloadError。"""
    folder = fetch_gpt2(name, local_dir, allow_download)
    cfg = gpt2_config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = load_weights(GPTModel(cfg), convert_hf_gpt2_state(load_file(str(folder / "model.safetensors")), cfg))
    return model.to(device).eval(), cfg
