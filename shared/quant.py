"""只量化权重的 int8 (weight-only int8)：逐输出通道的对称量化、在矩阵乘法里反量化的 Int8Linear、
以及把 GPTModel 的线性层整体替换的 quantize_model，在 05_pretraining/bonus_fast_generation 中讲解。"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 05_pretraining/bonus_fast_generation.ipynb ----
def quantize_int8(weight):
    """逐输出通道（每一行）的对称 int8 量化：scale = max|w| / 127，q = round(w / scale)。返回 (q, scale)。"""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """只量化权重的线性层：存 int8 权重与每行的 scale；计算 y = (x·qᵀ)·scale + b，激活保持浮点。"""

    def __init__(self, linear, dtype=torch.bfloat16):
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach().float())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x):
        fused = hasattr(torch, "_weight_int8pack_mm") and x.device.type == "cpu" and x.dtype == self.scale.dtype
        if fused:  # 融合内核：边读 int8 边乘加，最后乘 scale
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight_int8, self.scale)
            y = y.view(*x.shape[:-1], -1)
        else:  # 参考实现：同一个公式，但先把整块权重转成浮点
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_model(model, dtype=torch.bfloat16):
    """把 GPTModel 的全部线性层（含输出层）换成 Int8Linear，其余参数（嵌入、LayerNorm）转成 dtype；原地修改并返回。"""
    for module in list(model.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child, dtype))
    return model.to(dtype)
