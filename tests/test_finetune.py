"""第 6 章：分类微调与指令微调的共享代码（shared.classifier / shared.instruct / shared.finetune）。"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from shared.checkpoint import ch05_checkpoint_path, load_model, save_checkpoint
from shared.classifier import (
    balanced_split, calc_accuracy, classify_text, collate_classification, confusion_matrix, evaluate_classifier,
    last_token_logits, load_sms_spam, replace_head_and_freeze, train_classifier,
)
from shared.finetune import load_base_model, shrink_for_gpt2_on_cpu
from shared.instruct import (
    collate_instruction, extract_response, format_input, format_prompt, generate_response, has_prompt_echo,
    instruct_checkpoint_path, is_well_formed, jaccard, load_instruction_data, minhash, near_duplicates, normalize_text,
    ollama_models, rouge_l, save_instruct_model, shingles, split_instruction_data, token_f1,
)
from shared.model import GPTModel, model_config
from shared.tokenizer import EOT_ID
from shared.train import IGNORE_INDEX, calc_loss_batch, configure_optimizer
from tests.conftest import available

PAD_ID = EOT_ID

# 提示词 [1,2,3] + 回答 [4,5]；提示词 [6,7] + 回答 [8]；提示词 [9,10,11] + 回答 [12..15]
TOY_BATCH = [([1, 2, 3, 4, 5], 3), ([6, 7, 8], 2), ([9, 10, 11, 12, 13, 14, 15], 3)]
X = -100


def test_collate_instruction_without_prompt_mask():
    inputs, targets = collate_instruction(TOY_BATCH, pad_id=0)
    assert inputs.tolist() == [
        [1, 2, 3, 4, 5, 0, 0],
        [6, 7, 8, 0, 0, 0, 0],
        [9, 10, 11, 12, 13, 14, 15],
    ]
    # 目标右移一位；第一个结束符 (0) 保留，其后的填充为 -100
    assert targets.tolist() == [
        [2, 3, 4, 5, 0, X, X],
        [7, 8, 0, X, X, X, X],
        [10, 11, 12, 13, 14, 15, 0],
    ]


def test_collate_instruction_with_prompt_mask_and_max_length():
    _, targets = collate_instruction(TOY_BATCH, pad_id=0, mask_prompt=True)
    # 提示词长 p 时，目标位置 0..p-2 屏蔽，位置 p-1 的目标是回答的第一个 token
    assert targets.tolist() == [
        [X, X, 4, 5, 0, X, X],
        [X, 8, 0, X, X, X, X],
        [X, X, 12, 13, 14, 15, 0],
    ]
    inputs, targets = collate_instruction(TOY_BATCH, pad_id=0, mask_prompt=True, allowed_max_length=4)
    assert inputs.shape == targets.shape == (3, 4)
    assert targets.tolist() == [[X, X, 4, 5], [X, 8, 0, X], [X, X, 12, 13]]


def test_collate_instruction_default_pad_and_ignore_index():
    inputs, targets = collate_instruction([([5, 6], 1), ([7], 1)])
    assert inputs.tolist() == [[5, 6], [7, PAD_ID]]
    assert targets.tolist() == [[6, PAD_ID], [PAD_ID, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="空序列"):
        collate_instruction([([], 0)])


class LogitTable(nn.Module):
    """手工构造的“模型”：不管输入是什么，都输出同一张 logits 表 (B, T, V)；keep 给定时像 GPTModel 一样只返回这些位置。"""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx, keep=None):
        return self.logits if keep is None else self.logits[keep]


def test_calc_loss_batch_averages_only_unmasked_targets():
    inputs, targets = collate_instruction(TOY_BATCH, pad_id=0, mask_prompt=True)
    logits = torch.randn(*targets.shape, 16, generator=torch.Generator().manual_seed(0))
    keep = targets != IGNORE_INDEX
    # 手算：未被屏蔽的位置上 -log softmax 的平均
    manual = -torch.log_softmax(logits, dim=-1)[keep].gather(-1, targets[keep][:, None]).mean()
    loss = calc_loss_batch(inputs, targets, LogitTable(logits), "cpu")
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    logits[~keep] += 50 * torch.randn_like(logits[~keep])  # 被屏蔽的位置随便改
    assert calc_loss_batch(inputs, targets, LogitTable(logits), "cpu").item() == pytest.approx(loss.item(), abs=1e-6)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(model_config("tiny"))


def test_classification_head_shape_and_freezing():
    model = replace_head_and_freeze(_tiny_model(), num_classes=2, trainable_blocks=1)
    last = len(model.trf_blocks) - 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith((f"trf_blocks.{last}.", "final_norm.", "out_head."))}
    assert trainable == expected and "out_head.bias" in trainable
    assert not model.tok_emb.weight.requires_grad and model.out_head.weight is not model.tok_emb.weight
    x = torch.randint(0, 50257, (3, 7))
    assert model(x).shape == (3, 7, 2)
    assert last_token_logits(model, x, torch.tensor([7, 3, 1])).shape == (3, 2)

    full = replace_head_and_freeze(_tiny_model(), num_classes=3, trainable_blocks=None)
    assert all(p.requires_grad for p in full.parameters()) and full.out_head.out_features == 3
    with pytest.raises(ValueError, match="trainable_blocks 应在 0 到 2 之间，收到 99"):
        replace_head_and_freeze(_tiny_model(), trainable_blocks=99)


def test_last_token_logits_ignores_right_padding():
    model = replace_head_and_freeze(_tiny_model(), num_classes=2).eval()
    batch = [([11, 12, 13, 14], 1), ([21, 22], 0)]
    input_ids, lengths, labels = collate_classification(batch)
    assert input_ids.tolist() == [[11, 12, 13, 14], [21, 22, PAD_ID, PAD_ID]]
    assert lengths.tolist() == [4, 2] and labels.tolist() == [1, 0]
    with torch.no_grad():
        batched = last_token_logits(model, input_ids, lengths)
        alone = model(torch.tensor([[21, 22]]))[0, -1]
    assert torch.allclose(batched[1], alone, atol=1e-5)  # 容差 1e-5：右侧填充不影响真实 token


def test_calc_accuracy_and_confusion_matrix():
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [1.5, 0.5], [-1.0, 1.0]])  # 预测 0, 1, 0, 1
    labels = torch.tensor([0, 1, 1, 0])
    assert calc_accuracy(logits, labels) == pytest.approx(0.5)
    assert confusion_matrix(logits.argmax(-1), labels).tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="样本数不符"):
        calc_accuracy(logits, labels[:2])


def test_response_extraction_and_format_checks():
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    prompt = format_prompt(entry)
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input" not in prompt
    assert "### Input:\nx" in format_input({"instruction": "a", "input": "x", "output": ""})
    assert extract_response(prompt + "### Response:\n Hello there. <|endoftext|>junk", prompt) == "Hello there."
    with pytest.raises(ValueError, match="不以提示词开头"):
        extract_response("something else", prompt)
    assert has_prompt_echo("Hi.\n\n### Instruction:\nSay") and not has_prompt_echo("Hi.")
    assert is_well_formed("Hi.", ended=True)
    assert not is_well_formed("Hi.", ended=False) and not is_well_formed("  ", ended=True)


def test_token_f1_and_rouge_l_known_values():
    ref = "The cat sat on the mat."
    assert token_f1(ref, ref) == pytest.approx(1.0) and rouge_l(ref, ref) == pytest.approx(1.0)
    # 同样的词、不同的顺序：词袋 F1 = 1；LCS = the sat on the（4 词），P = R = 4/6
    assert token_f1("the mat sat on the cat", ref) == pytest.approx(1.0)
    assert rouge_l("the mat sat on the cat", ref) == pytest.approx(4 / 6)
    # "the cat": P = 2/2, R = 2/6 -> F1 = 0.5（两个指标相同）
    assert token_f1("the cat", ref) == pytest.approx(0.5) and rouge_l("the cat", ref) == pytest.approx(0.5)
    assert token_f1("A dog barked.", ref) == 0.0 and rouge_l("", ref) == 0.0 and rouge_l("", "") == 1.0


def test_ollama_unreachable_returns_none():
    assert ollama_models("http://127.0.0.1:9", timeout=0.5) is None


def test_sms_spam_counts_and_balanced_split():
    df = available(load_sms_spam)
    assert len(df) == 5574 and (df["label"] == "spam").sum() == 747
    splits = balanced_split(df, seed=123)
    for part in splits.values():
        counts = part["label"].value_counts()
        assert counts["ham"] == counts["spam"]
    texts = [set(p["text"]) for p in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert balanced_split(df, seed=123)["test"].equals(splits["test"])  # 固定种子 -> 同样的切分


def test_instruction_data_and_split():
    data = available(load_instruction_data)
    assert len(data) == 1100
    train, val, test = split_instruction_data(data, seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(map(id, train + val + test)) == sorted(map(id, data))


# ---------- 起点模型、分类训练与指令模型的保存 ----------

def _small_cfg():
    return dict(model_config("tiny"), vocab_size=64, context_length=16, emb_dim=32)


def test_load_base_model_prefers_chapter5_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ch05_gpt_tiny.safetensors"):
        load_base_model("tiny", allow_fallback=False)
    torch.manual_seed(0)
    saved = GPTModel(_small_cfg())
    save_checkpoint(ch05_checkpoint_path("tiny"), saved, step=5)
    model, cfg, source = load_base_model("tiny")
    assert source == "ch05" and cfg == _small_cfg() and not model.training
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x), saved.eval()(x))


def test_load_base_model_falls_back_to_a_short_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path))
    model, cfg, source = available(lambda: load_base_model("tiny"))
    assert source == "fallback" and cfg == model_config("tiny")
    assert (tmp_path / "ch06_fallback_tiny.safetensors").is_file()  # 缓存下来，下一个笔记本直接复用
    again, _, _ = load_base_model("tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def _toy_classification(n=48, seed=0):
    """两类玩具数据：类别 1 的序列以 token 7 结尾，类别 0 以 8 结尾；长度不一，右侧用 0 填充。
    分类器必须取到每条序列**真实的**最后一个 token，取到填充位置就学不会。"""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(10, 64, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        items.append((ids + [7 if i % 2 else 8], i % 2))
    return items


def test_train_and_evaluate_classifier_learn_a_toy_task():
    torch.manual_seed(0)
    model = replace_head_and_freeze(GPTModel(_small_cfg()), num_classes=2, trainable_blocks=None)
    collate = lambda batch: collate_classification(batch, pad_id=0)
    train = DataLoader(_toy_classification(), batch_size=8, shuffle=True, drop_last=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(_toy_classification(seed=1), batch_size=8, collate_fn=collate)
    loss_before, acc_before = evaluate_classifier(model, val, "cpu")
    history = train_classifier(model, train, val, configure_optimizer(model, lr=3e-3), "cpu", num_epochs=6,
                               eval_every=6, eval_batches=2, progress=False)
    assert history["epoch_step"] == [6, 12, 18, 24, 30, 36] and history["step"] == [6, 12, 18, 24, 30, 36]
    assert len(history["train_acc"]) == len(history["val_acc"]) == 6
    loss_after, acc_after = evaluate_classifier(model, val, "cpu")
    assert loss_after < loss_before and acc_after >= 0.9 > acc_before
    assert history["val_acc"][-1] == pytest.approx(acc_after)
    # evaluate_classifier 的准确率就是对每条序列单独算 argmax 的结果
    with torch.no_grad():
        singles = [int(model(torch.tensor([ids]))[0, -1].argmax() == label) for ids, label in _toy_classification(seed=1)]
    assert acc_after == pytest.approx(sum(singles) / len(singles))


def test_classify_text_restores_mode_and_rejects_empty_text():
    class Chars:
        encode = staticmethod(lambda text: [ord(c) % 64 for c in text])

    torch.manual_seed(0)
    model = replace_head_and_freeze(GPTModel(_small_cfg()), num_classes=2).train()
    label, prob = classify_text("abcdefghijklmnopqrstuvwxyz", model, Chars, "cpu", max_length=16)
    assert model.training  # 评估时临时切到 eval，之后恢复
    with torch.no_grad():
        probs = torch.softmax(model.eval()(torch.tensor([Chars.encode("abcdefghijklmnop")]))[0, -1], dim=-1)
    assert label == ("ham", "spam")[int(probs.argmax())] and prob == pytest.approx(probs.max().item(), abs=1e-6)
    with pytest.raises(ValueError, match="空文本"):
        classify_text("", model, Chars, "cpu", max_length=16)


class ScriptedTokenizer:
    """字符级的玩具分词器：每个字符一个 id（ord % 100），EOT_ID 解码成 <|endoftext|>。"""

    def encode(self, text):
        return [ord(c) % 100 for c in text]

    def decode(self, ids):
        return "".join("<|endoftext|>" if i == EOT_ID else chr(i) for i in ids)


class Scripted(nn.Module):
    """无论输入什么，都依次“说出”事先写好的 token 序列（按当前长度决定下一个 token）。"""

    def __init__(self, prompt_len, script):
        super().__init__()
        self.prompt_len, self.script = prompt_len, script
        self.cfg = {"context_length": 1024}

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, EOT_ID + 1)
        for t in range(idx.shape[1]):
            k = t + 1 - self.prompt_len
            logits[:, t, self.script[k] if 0 <= k < len(self.script) else 0] = 1.0
        return logits


def test_generate_response_stops_at_eot_and_reports_it():
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    tok = ScriptedTokenizer()
    prompt_len = len(tok.encode(format_prompt(entry)))
    model = Scripted(prompt_len, [ord(c) for c in " Hi!"] + [EOT_ID, ord("x")]).train()
    out = generate_response(model, entry, tok, "cpu", max_new_tokens=20, context_size=1024)
    assert out == {"response": "Hi!", "ended": True}
    assert model.training  # 生成时临时切到 eval，之后恢复
    cut = generate_response(model, entry, tok, "cpu", max_new_tokens=2, context_size=1024)
    assert cut == {"response": "H", "ended": False}  # 被长度截断：没有结束符


def test_instruct_model_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("LLM_PROFILE", "cpu")
    torch.manual_seed(0)
    model = GPTModel(_small_cfg())
    path = save_instruct_model(model, source="ch05")
    assert path == instruct_checkpoint_path() == tmp_path / "ch06_instruct_cpu.safetensors"
    assert instruct_checkpoint_path("tiny").name == "ch06_instruct_tiny.safetensors"
    loaded = load_model(path)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.cfg == model.cfg and not loaded.training


# ---------- 近似重复检测 ----------

def test_normalize_shingles_and_jaccard():
    assert normalize_text("  Give THREE tips,   for staying healthy!") == "give three tips for staying healthy"
    assert shingles("Give three tips for staying") == {"give three tips", "three tips for", "tips for staying"}
    assert shingles("Hi there") == {"hi there"}  # 不足 n 个词：整体算一个元素
    a, b = {"x", "y", "z"}, {"y", "z", "w"}
    assert jaccard(a, b) == pytest.approx(2 / 4) and jaccard(set(), set()) == 1.0


def test_minhash_agreement_estimates_jaccard():
    a = {f"w{i}" for i in range(100)}
    b = {f"w{i}" for i in range(50, 150)}  # 交集 50，并集 150：J = 1/3
    sig_a, sig_b = minhash(a, num_hashes=512), minhash(b, num_hashes=512)
    agree = np.mean([x == y for x, y in zip(sig_a, sig_b)])
    assert agree == pytest.approx(1 / 3, abs=0.07)  # 标准差 sqrt(J(1-J)/512) ≈ 0.02
    assert minhash(a) == minhash(set(a))  # 签名只取决于集合本身


def test_near_duplicates_finds_crafted_pairs_like_brute_force():
    texts = [
        "Give three tips for staying healthy.",
        "give three tips for staying healthy",            # 只差大小写与标点：J = 1
        "Give three tips for staying healthy and happy.",  # 多了两个词：J = 4/6
        "Translate the following sentence into French.",
        "Translate the following sentence into German.",  # 换了最后一个词：J = 3/5
        "What is the capital of France?",
    ]
    assert near_duplicates(texts, threshold=0.9) == [(0, 1, 1.0)]
    pairs = near_duplicates(texts, threshold=0.5)
    brute = sorted((i, j, jaccard(shingles(texts[i]), shingles(texts[j])))
                   for i in range(len(texts)) for j in range(i + 1, len(texts))
                   if jaccard(shingles(texts[i]), shingles(texts[j])) >= 0.5)
    assert sorted(pairs) == brute and {(0, 2), (1, 2), (3, 4)} <= {(i, j) for i, j, _ in pairs}
    with pytest.raises(ValueError, match="必须能被 bands=5 整除"):
        near_duplicates(texts, num_hashes=64, bands=5)


# ---------- 起点模型：有 GPT-2 就用 GPT-2 ----------

def _tiny_gpt2_in_mirror(mirror):
    transformers = pytest.importorskip("transformers")
    folder = mirror / "huggingface.co" / "openai-community" / "gpt2" / "resolve" / "main"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
def test_load_base_model_picks_gpt2_from_the_mirror_and_fine_tunes(tmp_path, monkeypatch, capsys, profile):
    _tiny_gpt2_in_mirror(tmp_path / "mirror")
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.delenv("LLM_ALLOW_DOWNLOAD", raising=False)
    model, cfg, source = load_base_model(profile)
    assert source == "gpt2" and cfg["n_layers"] == 2 and cfg["emb_dim"] == 16 and capsys.readouterr().out == ""
    model = replace_head_and_freeze(model, num_classes=2, trainable_blocks=1)
    collate = lambda batch: collate_classification(batch, pad_id=0)
    loader = DataLoader(_toy_classification(16), batch_size=8, collate_fn=collate)
    history = train_classifier(model, loader, loader, configure_optimizer(model, lr=1e-3), "cpu", num_epochs=1,
                               eval_every=1, eval_batches=1, progress=False)
    assert history["step"] == [1, 2] and len(history["val_acc"]) == 1


def test_without_gpt2_the_fallback_is_taken_and_said_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LLM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.delenv("LLM_ALLOW_DOWNLOAD", raising=False)
    torch.manual_seed(0)
    save_checkpoint(ch05_checkpoint_path("cpu"), GPTModel(_small_cfg()), step=1)
    model, cfg, source = load_base_model("cpu")
    out = capsys.readouterr().out
    assert source == "ch05" and cfg == _small_cfg()
    assert out.count("\n") == 1 and "没有用 GPT-2 124M" in out and "LLM_ALLOW_DOWNLOAD=1" in out


def test_shrink_for_gpt2_on_cpu_applies_only_to_gpt2_sized_models_on_the_cpu(capsys):
    overrides = {"num_epochs": 1}
    for cfg, device, changed in ((model_config("tiny"), "cpu", False), (model_config("gpt2-small (124M)"), "cuda", False),
                                 (model_config("gpt2-small (124M)"), "cpu", True)):
        settings = {"num_epochs": 3, "lr": 1e-3}
        shrink_for_gpt2_on_cpu(settings, overrides, cfg, device)
        assert settings == ({"num_epochs": 1, "lr": 1e-3} if changed else {"num_epochs": 3, "lr": 1e-3})
        assert ("改用 {'num_epochs': 1}" in capsys.readouterr().out) == changed
