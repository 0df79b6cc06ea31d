"""第 6 章：分类微调与指令微调的共享代码（shared.classifier / shared.instruct / shared.finetune）。"""
import os

import pytest
import torch

from shared.classifier import (
    PAD_ID, balanced_split, calc_accuracy, collate_classification, confusion_matrix, last_token_logits,
    load_sms_spam, replace_head_and_freeze,
)
from shared.instruct import (
    IGNORE_INDEX, collate_instruction, extract_response, format_input, format_prompt, has_prompt_echo,
    is_well_formed, load_instruction_data, ollama_models, rouge_l, split_instruction_data, token_f1,
)
from shared.model import GPTModel, model_config

needs_mirror = pytest.mark.skipif(not os.environ.get("LLM_MIRROR"), reason="需要 LLM_MIRROR 离线镜像")

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
    with pytest.raises(ValueError):
        collate_instruction([([], 0)])


def test_masked_targets_do_not_change_loss():
    _, targets = collate_instruction(TOY_BATCH, pad_id=0, mask_prompt=True)
    logits = torch.randn(*targets.shape, 16, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    logits[targets == IGNORE_INDEX] += 50 * torch.randn_like(logits[targets == IGNORE_INDEX])
    loss2 = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(loss, loss2, atol=1e-6)  # 容差 1e-6：被屏蔽的位置完全不参与


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
    with pytest.raises(ValueError):
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
    with pytest.raises(ValueError):
        calc_accuracy(logits, labels[:2])


def test_response_extraction_and_format_checks():
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    prompt = format_prompt(entry)
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input" not in prompt
    assert "### Input:\nx" in format_input({"instruction": "a", "input": "x", "output": ""})
    assert extract_response(prompt + "### Response:\n Hello there. <|endoftext|>junk", prompt) == "Hello there."
    with pytest.raises(ValueError):
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


@needs_mirror
def test_sms_spam_counts_and_balanced_split():
    df = load_sms_spam()
    assert len(df) == 5574 and (df["label"] == "spam").sum() == 747
    splits = balanced_split(df, seed=123)
    for part in splits.values():
        counts = part["label"].value_counts()
        assert counts["ham"] == counts["spam"]
    texts = [set(p["text"]) for p in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert balanced_split(df, seed=123)["test"].equals(splits["test"])  # 固定种子 -> 同样的切分


@needs_mirror
def test_instruction_data_and_split():
    data = load_instruction_data()
    assert len(data) == 1100
    train, val, test = split_instruction_data(data, seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(map(id, train + val + test)) == sorted(map(id, data))
