"""LoRA（低秩适配，low-rank adaptation）：低秩旁路、替换线性层、合并/拆分与只保存适配器，在 07_lora 中讲解。"""
import math

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .checkpoint import load_weights
from .runtime import atomic_write

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 07_lora/01_lora.ipynb ----
class LoRALayer(nn.Module):
    """低秩旁路 x -> (x @ A @ B) * alpha / rank。A 随机初始化，B 为零，所以初始时旁路输出恒为 0。"""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA 的秩 rank 必须是正整数，收到 {rank!r}")
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.scaling = alpha / rank

    def delta_weight(self):
        """与 nn.Linear.weight 同形状 (out_dim, in_dim) 的增量 ΔW = (A @ B)^T * alpha / rank。"""
        return (self.A @ self.B).T * self.scaling

    def forward(self, x):
        return (x @ self.A @ self.B) * self.scaling


class LinearWithLoRA(nn.Module):
    """冻结的 nn.Linear 加上一个 LoRA 旁路；merge() 把旁路并进权重，unmerge() 再拆出来。"""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)
        self.merged = False

    def forward(self, x):
        return self.linear(x) if self.merged else self.linear(x) + self.lora(x)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.linear.weight += self.lora.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.linear.weight -= self.lora.delta_weight()
            self.merged = False


ATTENTION_TARGETS = ("W_query", "W_key", "W_value", "out_proj")
MLP_TARGETS = ("ff.layers.0", "ff.layers.2")


def replace_linear_with_lora(model, rank, alpha, target_modules=ATTENTION_TARGETS):
    """把名字以 target_modules 中任一项结尾的 nn.Linear 换成 LinearWithLoRA，返回被替换的模块名列表。"""
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.endswith(tuple(target_modules))]
    if not targets:
        raise ValueError(f"target_modules={list(target_modules)} 没有匹配到模型中的任何 nn.Linear")
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, LinearWithLoRA(getattr(parent, child_name), rank, alpha))
    return targets


def freeze_except_lora(model):
    """冻结全部参数，只让 LoRA 的 A、B 可训练；返回 (可训练参数量, 总参数量)。"""
    for name, p in model.named_parameters():
        p.requires_grad = ".lora." in f".{name}"
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def set_merged(model, merged):
    """合并 (True) 或拆分 (False) 模型中所有的 LoRA 层。"""
    for module in model.modules():
        if isinstance(module, LinearWithLoRA):
            module.merge() if merged else module.unmerge()


def lora_state_dict(model):
    """只取出 LoRA 参数（A、B），这就是要保存/分发的“适配器”。"""
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".lora." in f".{name}"}


def save_adapter(model, path, metadata=None):
    """把适配器原子地保存为 safetensors 文件（通常只有几百 KB）；metadata 的值会转成字符串存进文件头。"""
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(lora_state_dict(model), str(tmp), metadata=metadata))


def load_adapter(model, path):
    """把 save_adapter 保存的 A、B 载入一个已经 replace_linear_with_lora 过的模型。
    用第 5 章的 load_weights 只核对、只读入 LoRA 参数：名字或形状不符时报错并写明是哪个张量。"""
    load_weights(model, load_file(str(path)), only=lora_state_dict(model))
