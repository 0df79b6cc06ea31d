"""微调的起点模型，在 06_finetuning/01_classification 中讲解；第 6、7 章与 DPO 选读笔记本共用。按优先级取得“预训练好的”
起点：真实 GPT-2 124M 权重（本机有，或 LLM_ALLOW_DOWNLOAD=1 时下载）→ 第 5 章自己训练的检查点 →（两者都没有时）
用 shared.train 在 Tiny Shakespeare 上做一次简短预训练并缓存。同时提供同结构、随机初始化的对照模型。"""
import torch

from .checkpoint import ch05_checkpoint_path, load_model, save_checkpoint
from .download import TINY_SHAKESPEARE, DownloadError, read_text
from .gpt2_weights import load_gpt2
from .model import GPTModel, config_for_profile
from .runtime import checkpoint_dir, get_profile, set_seed
from .tokenizer import get_gpt2_tokenizer
from .train import configure_optimizer, token_loader, train_model

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/01_classification.ipynb ----
SOURCE_NAMES = {
    "gpt2": "OpenAI 发布的 GPT-2 124M 预训练权重", "ch05": "第 5 章训练的检查点",
    "fallback": "第 5 章的检查点不存在，本章就地做的简短预训练（Tiny Shakespeare）",
}


def random_init_model(cfg, seed=123):
    """与预训练模型结构相同、参数随机初始化的 GPTModel（对照组）。"""
    set_seed(seed)
    return GPTModel(cfg)


def load_base_model(profile=None, device="cpu", allow_fallback=True):
    """返回 (model, cfg, source)：微调的起点模型（eval 模式）、它的配置，以及来源 "gpt2" / "ch05" / "fallback"。
    任何配置档都先找 GPT-2 124M：本机有（或 LLM_ALLOW_DOWNLOAD=1 时能下载到）就用它；否则用一行话说明原因，
    改用第 5 章在该配置档下训练的检查点；它也不存在时，就地做一次简短预训练（allow_fallback=False 时报错）。"""
    profile = get_profile(profile)
    try:
        model, cfg = load_gpt2("gpt2", device=device)
        return model, cfg, "gpt2"
    except DownloadError as e:
        print(f"没有用 GPT-2 124M（{str(e).splitlines()[0]}）。这次从第 5 章训练的模型开始。")
    path, source = ch05_checkpoint_path(profile), "ch05"
    if not path.exists():
        if not allow_fallback:
            raise FileNotFoundError(f"找不到第 5 章的检查点 {path.name}；请先运行第 5 章的笔记本")
        path, source = checkpoint_dir() / f"ch06_fallback_{profile}.safetensors", "fallback"
        if not path.exists():
            save_checkpoint(path, pretrain_fallback(profile, device), step=FALLBACK_STEPS[profile])
    model = load_model(path, device)
    return model, model.cfg, source


def shrink_for_gpt2_on_cpu(settings, overrides, cfg, device):
    """起点是 GPT-2 规模的模型（emb_dim >= 768）而设备是 CPU 时，用 overrides 覆盖 settings 并打印一行说明。
    各笔记本 cpu 配置档的方案是按第 5 章的小模型定的；GPT-2 124M 在 CPU 上每步要慢十倍以上。"""
    if torch.device(device).type == "cpu" and cfg["emb_dim"] >= 768:
        settings.update(overrides)
        print("GPT-2 规模的模型在 CPU 上：改用", overrides)


FALLBACK_STEPS = {"tiny": 30, "cpu": 60, "gpu": 1000}  # 兜底预训练的步数（cpu 档在 2 核上约几分钟）


def pretrain_fallback(profile=None, device="cpu", seed=123):
    """没有第 5 章检查点时的兜底：在 Tiny Shakespeare 上简短预训练一个 config_for_profile(profile) 模型。"""
    profile = get_profile(profile)
    cfg = config_for_profile(profile)
    ids = get_gpt2_tokenizer().encode(read_text(TINY_SHAKESPEARE))
    split = int(0.9 * len(ids))
    T = cfg["context_length"]
    train_loader = token_loader(ids[:split], batch_size=8, max_length=T, stride=T, seed=seed)
    val_loader = token_loader(ids[split:], batch_size=8, max_length=T, stride=T, shuffle=False)
    model = random_init_model(cfg, seed).to(device)
    optimizer = configure_optimizer(model, lr=1e-3)
    steps = FALLBACK_STEPS[profile]
    train_model(model, train_loader, val_loader, optimizer, device, max_steps=steps, eval_every=steps, eval_batches=4,
                max_lr=1e-3, warmup_steps=steps // 10, seed=seed, progress=False)
    return model.eval()
