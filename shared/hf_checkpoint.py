"""读取 Hugging Face safetensors 检查点（单文件或分片）：在 meta 设备上建模型，逐个张量读取并直接赋值，峰值内存约为一份模型，在 05_pretraining/bonus_gpt_to_llama 中讲解。"""
import json
from pathlib import Path

import torch.nn as nn
from safetensors import safe_open

from .gpt2_weights import find_hf_dir

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_gpt_to_llama.ipynb ----
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_index(folder):
    """张量名 -> 所在文件的 Path：单文件 model.safetensors，或分片检查点的 model.safetensors.index.json。"""
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    raise FileNotFoundError(f"{folder} 里既没有 {SINGLE_FILE}，也没有分片索引 {INDEX_FILE}"
                            "（不是 Hugging Face safetensors 格式的检查点？）")


def is_hf_checkpoint(folder):
    """folder 里有 config.json，以及 model.safetensors 或 model.safetensors.index.json。"""
    folder = Path(folder)
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in (SINGLE_FILE, INDEX_FILE))


def find_hf_checkpoint(repo, local_dir=None):
    """在本地找 Hugging Face 仓库 repo 的检查点目录（查找顺序同第 5 章的 find_hf_dir）。找不到返回 None。"""
    return find_hf_dir(repo, is_hf_checkpoint, local_dir)


def _assign(model, name, tensor):
    """把 tensor 直接设为模型里名为 name 的参数或缓冲区（不复制；相当于 assign=True）。"""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


def load_hf_weights(model, folder, rename, dtype=None, device="cpu"):
    """把 Hugging Face safetensors 检查点逐个张量地读入 model（通常在 meta 设备上构建），返回 model。

    rename(hf_name) 返回我们的参数名，或 None 表示跳过。每个张量检查形状后转成 dtype（默认为模型里该参数的类型）、
    放到 device 上，直接成为模型的参数，峰值内存约为一份模型。缺少、多余或形状不符的张量都抛出 ValueError 并写明名字。
    model.cfg["tie_embeddings"] 为真时，读完后 out_head.weight 重新指向 tok_emb.weight（检查点里的 lm_head 被忽略）；
    最后调用 model.init_buffers()（如果有）重建不进 state_dict 的缓冲区。
    """
    index = safetensors_index(folder)
    tied = bool(getattr(model, "cfg", {}).get("tie_embeddings", False))
    expected = model.state_dict(keep_vars=True)
    if tied:
        expected.pop("out_head.weight", None)
    renamed = {}
    for hf_name in index:
        ours = rename(hf_name)
        if ours is None or (tied and ours == "out_head.weight"):
            continue
        if ours not in expected:
            raise ValueError(f"检查点里的张量 {hf_name!r}（对应名字 {ours!r}）在模型里没有这个参数")
        if ours in renamed.values():
            raise ValueError(f"检查点里有两个张量都对应模型的 {ours!r}（其一是 {hf_name!r}）")
        renamed[hf_name] = ours
    missing = [name for name in expected if name not in renamed.values()]
    if missing:
        raise ValueError(f"检查点缺少 {len(missing)} 个张量，例如模型的 {', '.join(map(repr, missing[:3]))}")
    by_file = {}
    for hf_name, ours in renamed.items():
        by_file.setdefault(index[hf_name], []).append((hf_name, ours))
    for path, names in by_file.items():
        if not path.is_file():
            raise FileNotFoundError(f"分片索引提到的文件 {path.name} 不存在")
        with safe_open(path, framework="pt", device="cpu") as f:
            for hf_name, ours in names:
                target = expected[ours]
                shape = tuple(f.get_slice(hf_name).get_shape())
                if shape != tuple(target.shape):
                    raise ValueError(f"张量 {hf_name!r}（模型的 {ours!r}）形状不符："
                                     f"检查点 {shape}，模型 {tuple(target.shape)}")
                tensor = f.get_tensor(hf_name).to(device=device, dtype=dtype or target.dtype)
                _assign(model, ours, tensor)
    if tied:
        model.out_head.weight = model.tok_emb.weight
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"读取后这些张量仍在 meta 设备上（没有数据）：{still_meta[:3]}")
    return model
