"""读取 Hugging Face safetensors 检查点（单文件或分片）：在 meta 设备上建模型，逐个张量读出后由 load_weights(assign=True)
直接设为参数，峰值内存约为一份模型，在 05_pretraining/bonus_gpt_to_llama 中讲解。"""
import json
from pathlib import Path

from safetensors import safe_open

from .checkpoint import load_weights
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
    raise FileNotFoundError(f"{folder} 里既没有 {SINGLE_FILE}，也没有分片索引 {INDEX_FILE}（不是 Hugging Face safetensors 格式的检查点？）")


def is_hf_checkpoint(folder):
    """folder 里有 config.json，以及 model.safetensors 或 model.safetensors.index.json。"""
    folder = Path(folder)
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in (SINGLE_FILE, INDEX_FILE))


def find_hf_checkpoint(repo, local_dir=None):
    """在本地找 Hugging Face 仓库 repo 的检查点目录（查找顺序同第 5 章的 find_hf_dir）。找不到返回 None。"""
    return find_hf_dir(repo, is_hf_checkpoint, local_dir)


def load_hf_weights(model, folder, rename, dtype=None, device="cpu"):
    """把 Hugging Face safetensors 检查点（单文件或分片）读入 model（通常在 meta 设备上构建），返回 model。
    rename(hf_name) 返回我们的名字，或 None 表示跳过。张量逐个读出、转成 dtype（默认为模型里该参数的类型）放到 device 上，
    由 load_weights(assign=True) 核对后直接设为参数；与 transformers 相同，tie_embeddings 时忽略 lm_head。最后重建 RoPE 表。"""
    own = model.state_dict(keep_vars=True)
    tied = model.cfg.get("tie_embeddings", False)
    sources = {}  # 我们的名字 -> (HF 的名字, 文件)
    for hf_name, path in safetensors_index(folder).items():
        ours = rename(hf_name)
        if ours is None or (tied and ours == "out_head.weight"):
            continue
        if ours in sources:
            raise ValueError(f"检查点里的 {sources[ours][0]!r} 与 {hf_name!r} 都对应模型的 {ours!r}")
        sources[ours] = (hf_name, path)
    state = {}
    for path in sorted({path for _, path in sources.values()}):
        if not path.is_file():
            raise FileNotFoundError(f"分片索引提到的文件 {path.name} 不存在")
        with safe_open(path, framework="pt", device="cpu") as f:
            for ours, (hf_name, source) in sources.items():
                if source == path:
                    target = dtype or (own[ours].dtype if ours in own else None)
                    state[ours] = f.get_tensor(hf_name).to(device=device, dtype=target)
    load_weights(model, state, assign=True, file_names={ours: hf_name for ours, (hf_name, _) in sources.items()})
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    return model
