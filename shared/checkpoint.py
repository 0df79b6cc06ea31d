"""检查点：唯一的“先核对、再读入”的权重加载函数 load_weights，原子保存、读取与按元数据重建课程模型，
在 05_pretraining 中讲解。"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .model import GPTModel
from .runtime import atomic_write, checkpoint_dir, get_profile

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/01_pretraining.ipynb ----
def load_weights(model, state, assign=False, only=None, file_names=None):
    """把 state（名字 -> 张量）读入 model，返回 model。课程里所有读权重的地方（检查点、GPT-2、HF、LoRA）都用它。
    先按名字核对：缺少、多余或形状不符的张量一起报成一个 ValueError，写明名字；核对通过才用 load_state_dict 读入。
    共享的权重（如 out_head.weight 与 tok_emb.weight）给出其中一个名字即可，读完后仍然共享。assign=True 时直接把张量
    设为参数而不复制（meta 设备上的模型用）；only 限定只核对、只读入这些名字；file_names 让错误信息同时写出文件里的张量名。"""
    file_names = file_names or {}
    label = lambda name: f"{name}（文件里的 {file_names[name]}）" if name in file_names else name  # 错误信息里的名字
    own = model.state_dict(keep_vars=True)
    first = {}  # 共享同一个张量的名字，都映射到其中第一个
    alias = {name: first.setdefault(id(t), name) for name, t in own.items()}
    expected = set(own) if only is None else set(only)
    unexpected = [label(n) for n in state if n not in expected or n not in own]
    shape = [f"{label(n)}: 文件 {tuple(state[n].shape)} / 模型 {tuple(own[n].shape)}"
             for n in own if n in state and n in expected and state[n].shape != own[n].shape]
    provided = {alias[n] for n in state if n in own}
    missing = [n for n in own if n in expected and alias[n] == n and n not in provided]
    problems = [f"{what} {len(names)} 个：{', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                for what, names in (("缺少", missing), ("多出", unexpected), ("形状不符", shape)) if names]
    if problems:
        raise ValueError("权重与模型不匹配（模型配置不同，或文件不是这个模型的？）——" + "；".join(problems))
    merged = {}
    for name, tensor in state.items():
        if alias[name] in merged and not torch.equal(merged[alias[name]], tensor):
            raise ValueError(f"{name} 与 {alias[name]} 在模型里共享权重，文件里却不相同")
        merged.setdefault(alias[name], tensor)
    model.load_state_dict(merged, strict=False, assign=assign)
    if assign:  # 读入的新参数替换了旧参数，共享关系要重新接上
        for name, key in alias.items():
            if name != key and key in merged:
                module, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(module), leaf, model.get_parameter(key))
    return model


def _unique_state_dict(model):
    """state_dict 去掉共享权重的重复项（权重共享时 out_head.weight 与 tok_emb.weight 是同一块内存）。"""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else (name,)
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach().contiguous().cpu()
    return state


def _optimizer_path(path):
    return Path(path).with_suffix(".optim.pt")


def save_checkpoint(path, model, optimizer=None, step=0, extra=None):
    """权重原子地存为 safetensors（元数据里有 step、模型配置 config 与 JSON 形式的 extra）；给出 optimizer 时其状态另存为
    同名的 .optim.pt（纯张量与基本类型，可用 weights_only=True 读回）。torch.compile 过的模型存原模型（名字不带 _orig_mod.）。"""
    model = getattr(model, "_orig_mod", model)
    metadata = {"step": str(int(step)), "extra": json.dumps(extra or {})}
    if hasattr(model, "cfg"):
        metadata["config"] = json.dumps(model.cfg)
    if optimizer is not None:  # 先写优化器，再写权重：两者的 step 在读取时互相核对
        state = {"step": int(step), "optimizer": optimizer.state_dict()}
        atomic_write(_optimizer_path(path), lambda tmp: torch.save(state, tmp))
    atomic_write(path, lambda tmp: save_file(_unique_state_dict(model), str(tmp), metadata=metadata))


def read_checkpoint_metadata(path):
    """只读元数据：返回 {"step": int, "config": dict 或 None, "extra": dict}。"""
    if not Path(path).exists():
        raise FileNotFoundError(f"找不到检查点文件 {Path(path).name}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"step": int(meta.get("step", 0)), "config": json.loads(meta["config"]) if "config" in meta else None,
            "extra": json.loads(meta.get("extra", "{}"))}


def load_checkpoint(path, model, optimizer=None):
    """把 save_checkpoint 保存的权重（以及可选的优化器状态）读回，返回 read_checkpoint_metadata 的结果。"""
    info = read_checkpoint_metadata(path)  # 文件不存在时在这里报错
    load_weights(getattr(model, "_orig_mod", model), load_file(str(path)))
    if optimizer is not None:
        opt_path = _optimizer_path(path)
        if not opt_path.exists():
            raise FileNotFoundError(f"找不到优化器状态文件 {opt_path.name}（保存时没有传入 optimizer？）")
        opt_state = torch.load(opt_path, map_location="cpu", weights_only=True)
        if opt_state["step"] != info["step"]:
            raise ValueError(f"优化器状态（step {opt_state['step']}）与权重（step {info['step']}）不是同一次保存的")
        optimizer.load_state_dict(opt_state["optimizer"])
    return info


def load_model(path, device="cpu"):
    """读取 save_checkpoint 保存的课程模型：按元数据里的配置重建 GPTModel、读入权重，返回 eval 模式的模型。"""
    cfg = read_checkpoint_metadata(path)["config"]
    if cfg is None:
        raise ValueError(f"{Path(path).name} 的元数据里没有模型配置，无法重建模型")
    model = GPTModel(cfg)
    load_checkpoint(path, model)
    return model.to(device).eval()


def ch05_checkpoint_path(profile=None):
    """第 5 章在该配置档（默认为当前配置档）下训练出的基础模型的路径，第 6、7 章从它开始。"""
    return checkpoint_dir() / f"ch05_gpt_{get_profile(profile)}.safetensors"
