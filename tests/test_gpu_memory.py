"""gpu 配置档的静态显存检查：读出每个笔记本的 SETTINGS["gpu"]，与它训练或运行的模型一起交给 shared.perf 的规划器，
断言峰值不超过 7 GiB（8 GB 的 RTX 5060 留出余量）。不需要 GPU，CI 里每次都跑。

规划器按不编译的 eager 训练估计（torch.compile 与 bf16 只会更省），它与实测的对照见 tests/test_perf.py
（saved_tensors_hooks，10% 以内）和 05_pretraining/bonus_training_speed 第 5 节（峰值 RSS 与 H200 上的实测）。
训练经过 shared.train.train_loop 的笔记本在 GPU 上还有运行时守卫：批次放不下就自动切成几份、梯度累加，
所以表里用 plan_split（守卫用的同一个函数）算出它会切成几份（“切分”一列），并断言切分后放得下。
"""
import ast
import functools
import importlib
import json
from pathlib import Path

import pytest
import torch

from shared.classifier import load_sms_spam
from shared.download import PREFERENCE_DATA, download
from shared.instruct import format_prompt, load_instruction_data
from shared.model import count_params_formula, model_config
from shared.perf import plan_generation_memory, plan_memory, plan_split
from shared.tokenizer import get_gpt2_tokenizer
from tests.conftest import available

REPO = Path(__file__).resolve().parents[1]
BUDGET = 7 * 2**30
GPT2 = model_config("gpt2-small (124M)")
P124 = count_params_formula(GPT2)

# gpu 档里模型在 CPU 上运行（或根本没有模型）的笔记本：显存不受影响，写明原因
CPU_ONLY = {
    "02_data_engineering/01_text_data.ipynb": "嵌入层的演示在 CPU 上",
    "02_data_engineering/bonus_bpe_from_scratch.ipynb": "只有分词器，没有模型",
    "03_attention/01_attention.ipynb": "注意力的演示与计时在 CPU 上",
    "04_gpt_model/bonus_kv_cache.ipynb": "讲的是 CPU 上批大小 1 的生成",
    "05_pretraining/bonus_fast_generation.ipynb": "讲的是 CPU 上批大小 1 的生成（device 固定为 cpu）",
    "05_pretraining/bonus_monitoring_and_tuning.ipynb": "训练、profiler 与搜索都固定在 CPU 上",
}


def _cells(nb):
    cells = json.loads((REPO / nb).read_text(encoding="utf-8"))["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))


def notebook_value(nb, name, profile="gpu"):
    """笔记本顶层 name = ... 的值；name = {...}[PROFILE] 这样按配置档取值的，取 profile 那一项。
    表达式里用到的其他名字同样在笔记本里找，找不到就按笔记本的 from ... import 导入。"""
    tree = _cells(nb)

    def resolve(target):
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == target for t in node.targets):
                return evaluate(node.value)
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):  # A, B = 1, 2
                names = [t.id for t in node.targets[0].elts if isinstance(t, ast.Name)]
                if target in names and isinstance(node.value, ast.Tuple):
                    return evaluate(node.value.elts[names.index(target)])
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == target for a in node.names):
                return getattr(importlib.import_module(node.module), target)
        raise KeyError(f"{nb} 里找不到 {target}")

    def evaluate(expr):
        if isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Dict):
            keys = [ast.literal_eval(k) for k in expr.value.keys]
            expr = expr.value.values[keys.index(profile)]
        names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} - {"dict"}
        return eval(compile(ast.Expression(expr), nb, "eval"), {"__builtins__": {}, "dict": dict},
                    {n: resolve(n) for n in names})

    return resolve(name)


@functools.cache
def longest():
    """第 6、7 章数据里最长的序列（token 数，含结束符）：collate 按批内最长的补齐，所以这就是序列长度的上限。"""
    tok = get_gpt2_tokenizer()
    pairs = json.loads(Path(available(lambda: download(PREFERENCE_DATA))).read_text(encoding="utf-8"))
    return {"instruction": max(len(tok.encode(format_prompt(e) + e["output"])) + 1
                               for e in available(load_instruction_data)),
            "preference": max(len(tok.encode(format_prompt(e))) + 1 + max(len(tok.encode(e[k])) for k in ("chosen", "rejected"))
                              for e in pairs),
            "sms": max(len(tok.encode(text)) for text in available(load_sms_spam)["text"])}


def train(cfg, rows, seq_len, *, amp=False, seqs=1, held=0, guarded=True, params=None):
    """一次训练步的规划：rows 条、每条 seqs 个长 seq_len 的序列；held 是显存里另外放着的字节数（例如参考模型）。
    guarded（经过 train_loop）时按守卫切分，返回 (份数, 峰值)。"""
    params = count_params_formula(cfg) if params is None else params
    if not guarded:
        return 1, held + plan_memory(cfg, rows * seqs, seq_len, amp=amp, params=params)["total"]
    batch = tuple(torch.zeros(rows, seq_len, dtype=torch.long) for _ in range(2 * seqs))
    chunks, plan = plan_split(cfg, params, batch, BUDGET, held + 4 * params, amp=amp)
    return chunks, held + plan["total"]


def workloads(nb):
    """每个笔记本在 gpu 档的显存大户：{名称: (切分份数, 规划峰值字节)}。"""
    s = notebook_value(nb, "SETTINGS")
    if nb == "01_pytorch/01_pytorch_basics.ipynb":
        n = max(s["matmul_sizes"])
        return {f"matmul {n}x{n} fp32": (1, 3 * n * n * 4)}
    if nb == "01_pytorch/bonus_ddp.ipynb":  # 至少 2 块 GPU 时才用 gpu：单进程对照每步 2b 条，DDP 每个进程 b 条
        return {"single process, 2b x 1024": train(GPT2, 2 * s["batch"], 1024, amp=True),
                "DDP rank, b x 1024": train(GPT2, s["batch"], 1024, amp=True)}
    if nb == "02_data_engineering/bonus_embedding_vs_linear.ipynb":
        n, V, d = max(s["n_tokens"]), s["vocab_size"], s["emb_dim"]  # one_hot 的 int64 与 float 两份，加权重、梯度与输出
        return {f"one-hot {n} x {V}": (1, n * V * (8 + 4) + 3 * V * d * 4 + 2 * n * d * 4)}
    if nb == "04_gpt_model/01_gpt_model.ipynb":
        return {"init experiment": train(GPT2, s["micro_batch"], 1024, guarded=False)}
    if nb == "05_pretraining/01_pretraining.ipynb":
        cfg = dict(model_config(s["model"]), **s["speedups"])
        return {"pretraining": train(cfg, s["batch_size"], s["max_length"], amp=True)}
    if nb in ("05_pretraining/bonus_gemma3.ipynb", "05_pretraining/bonus_gpt_to_llama.ipynb"):
        width, context = notebook_value(nb, "WIDTH"), notebook_value(nb, "CONTEXT")
        char = dict(GPT2, vocab_size=100, emb_dim=width, n_layers=4, n_heads=4, context_length=context)
        return {"char-level models": train(char, 16, context)}
    if nb == "05_pretraining/bonus_qwen3.ipynb":  # MoE：按激活的专家近似成 GPT 的前馈层；词表取 GPT-2 的上限
        m = s["moe_model"]
        cfg = dict(GPT2, emb_dim=m["emb_dim"], n_layers=m["n_layers"], n_heads=m["n_heads"])
        experts = m["num_experts"] * 3 * m["emb_dim"] * m["moe_hidden_dim"] * m["n_layers"]
        return {"MoE training": train(cfg, s["batch_size"], s["max_length"], params=count_params_formula(cfg) + experts)}
    if nb == "05_pretraining/bonus_tang_poetry_gpt.ipynb":  # 逐字词表按 8000 个的上限规划；分词器对比里 GPT-2 的词表最大
        char = dict(GPT2, vocab_size=8000, context_length=s["context"], **s["model"])
        small = dict(GPT2, vocab_size=50257, context_length=s["cmp_context"], **s["cmp_model"])
        return {"char-level GPT": train(char, s["batch"], s["context"]),
                "tokenizer comparison (GPT-2 vocab)": train(small, 16, s["cmp_context"])}
    if nb == "06_finetuning/bonus_tang_poetry_sft_rl.ipynb":  # 起点是上一本 gpu 档的模型（词表上限 8000 + 模板字符）
        base = notebook_value("05_pretraining/bonus_tang_poetry_gpt.ipynb", "SETTINGS")
        char = dict(GPT2, vocab_size=8100, context_length=128, **base["model"])
        ref = 4 * count_params_formula(char)  # 冻结的参考模型
        return {"SFT": train(char, s["sft_batch"], 128),
                "DPO (chosen + rejected)": train(char, s["dpo_batch"], 128, seqs=2, held=ref),
                "GRPO rollout batch": train(char, s["group"] * s["prompts_per_step"], 128, held=ref)}
    if nb == "05_pretraining/bonus_training_speed.ipynb":
        b, t = s["batch"], s["seq"]
        shapes = {(b, t), (s["ckpt_batch"], t), *((x, t) for x in s["batches"]), *((b, x) for x in s["seqs"])}
        runs = {f"ladder {x} x {y}": (1, plan_memory(dict(GPT2, pad_vocab_to=64), x, y, amp=True)["total"])
                for x, y in sorted(shapes)}
        runs.update({f"planner check {x} x {y} sdpa={sdpa}": (1, plan_memory(dict(GPT2, sdpa=sdpa), x, y)["total"])
                     for x, y, sdpa in s["plan_checks"]})
        return runs
    if nb == "06_finetuning/bonus_classification_experiments.ipynb":  # 字符级 GPT（汉字词表按 4000 个的上限规划）
        cfg = dict(GPT2, vocab_size=4000, context_length=max(s["lengths"] + (s["context"],)), **s["model"])
        held = 4 * count_params_formula(cfg)  # 预训练起点一直在显存里，微调用它的拷贝
        return {"char-level pretraining": train(cfg, s["pretrain_batch"], s["context"]),
                "classifier, longest truncation": train(dict(cfg, vocab_size=2), s["batch_size"], max(s["lengths"]),
                                                        held=held, params=count_params_formula(cfg))}
    base = 4 * P124  # 第 6、7 章：起点模型一直留在显存里，每次训练用它的一份拷贝
    n = longest()  # gpu 档从 GPT-2 出发：上下文 1024，比数据里最长的序列还长，所以序列长度取数据的最长值
    sms = min(n["sms"], s.get("max_length") or 1024)
    if nb == "06_finetuning/01_classification.ipynb":  # 只有最后一个 token 过 2 类的输出头
        return {"classifier, all params": train(dict(GPT2, vocab_size=2), s["batch_size"], sms, held=base, params=P124)}
    if nb == "06_finetuning/02_instruction.ipynb":
        gen = plan_generation_memory(GPT2, 1, n["instruction"] + s["max_new_tokens"])["kv_cache"]
        return {"instruction SFT": train(GPT2, s["batch_size"], n["instruction"], held=base),
                "generation": (1, 2 * 4 * P124 + gen)}
    if nb == "06_finetuning/bonus_dpo.ipynb":  # 策略 + 冻结的参考模型；chosen 与 rejected 两条序列
        return {"SFT": train(GPT2, 8, n["instruction"], held=base),
                "DPO": train(GPT2, s["batch_size"], n["preference"], seqs=2, held=2 * base)}
    if nb == "06_finetuning/bonus_chat_server.ipynb":  # 服务进程与笔记本各载入一份指令模型，服务一次生成一条
        return {"serving the instruction model": (1, 2 * 4 * P124 + plan_generation_memory(GPT2, 1, 1024)["kv_cache"])}
    if nb == "07_lora/01_lora.ipynb":  # LoRA 的可训练参数少得多，按全参数规划是上限
        return {"spam classifier": train(dict(GPT2, vocab_size=2), s["batch_size"], sms, held=base, params=P124),
                "instruction": train(GPT2, s["instr_batch"], n["instruction"], held=base)}
    raise KeyError(nb)


NOTEBOOKS = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("0*/*.ipynb"))
GPU_NOTEBOOKS = [nb for nb in NOTEBOOKS if nb not in CPU_ONLY]


def test_every_notebook_is_planned_or_explained():
    """新笔记本必须在 workloads 里有规划，或在 CPU_ONLY 里写明为什么不占显存；每个都有 gpu 档的 SETTINGS。"""
    for nb in NOTEBOOKS:
        assert isinstance(notebook_value(nb, "SETTINGS"), dict), nb
        assert nb in CPU_ONLY or workloads(nb), nb


@pytest.mark.parametrize("nb", GPU_NOTEBOOKS)
def test_gpu_profile_fits_in_7_gib(nb):
    for name, (chunks, peak) in workloads(nb).items():
        assert peak <= BUDGET, f"{nb} / {name}: 规划峰值 {peak / 2**30:.2f} GiB（切成 {chunks} 份后）超过 7 GiB"


def test_planned_table(capsys):
    """打印每个笔记本的规划峰值（pytest -s 可见），也核对：主线训练不靠守卫切分就放得下。"""
    rows = [(nb, name, chunks, peak) for nb in GPU_NOTEBOOKS for name, (chunks, peak) in workloads(nb).items()]
    for nb, name, chunks, peak in rows:
        print(f"{nb:52} {name:34} 切分 {chunks}  {peak / 2**30:5.2f} GiB")
    split = {(nb, name) for nb, name, chunks, _ in rows if chunks > 1}
    assert ("05_pretraining/01_pretraining.ipynb", "pretraining") not in split
    assert all(nb.startswith(("06_", "07_", "01_pytorch/bonus_ddp")) for nb, _ in split), split


def test_settings_reader_sees_the_real_values():
    assert notebook_value("05_pretraining/01_pretraining.ipynb", "SETTINGS", "cpu")["model"] == "cpu"
    assert notebook_value("05_pretraining/bonus_gemma3.ipynb", "SETTINGS")["seeds"] == (1, 2, 3)  # SEEDS 来自 import
    with pytest.raises(KeyError, match="找不到 NO_SUCH_NAME"):
        notebook_value("05_pretraining/01_pretraining.ipynb", "NO_SUCH_NAME")
