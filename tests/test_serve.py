"""shared.serve：OpenAI 兼容的服务与网页聊天界面。服务运行在真正的子进程里（只监听 127.0.0.1、系统挑选的空闲端口），
用官方 openai 客户端、httpx 与无头 Chromium 访问；期望的回答在测试进程里直接调用 shared.generate 得到。"""
import json
import re
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from shared.checkpoint import load_model, save_checkpoint
from shared.generate import generate
from shared.gpt2_weights import export_gpt2_to_hf
from shared.instruct import format_prompt
from shared.model import GPTModel, model_config
from shared.runtime import REPO_ROOT
from shared.serve import (ServerProcess, TextStream, add_gpt2_tokenizer, alpaca_entry, chat_in_browser, check_messages,
                          find_chromium, load_served_model)
from shared.tokenizer import EOT_ID, get_gpt2_tokenizer
from tests.conftest import available

TOKENIZER = get_gpt2_tokenizer()
CONTEXT = 128  # 小模型的上下文长度
LIMIT = 1000  # 服务的 --max-tokens-limit
BODY_LIMIT = 20_000  # 服务的 --max-body-bytes
LONG_CONTEXT = 1024  # 断开连接的测试用：要生成很久的模型
QUESTION = "Give three tips for staying healthy."
TIMEOUT = 60  # 每个 HTTP 请求的上限（秒）：服务卡住时测试失败而不是一直等


def tiny_gpt(seed, context_length=CONTEXT):
    torch.manual_seed(seed)
    return GPTModel(dict(model_config("tiny"), context_length=context_length)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """临时的检查点目录：第 5 章的基础模型、第 6 章的指令模型（按 tiny 配置档的文件名，预设名能找到它们），
    一个总是先输出结束符的模型，和一个上下文很长的模型。返回 {名字: 路径}。"""
    folder = tmp_path_factory.mktemp("checkpoints")
    eos_model = tiny_gpt(3)
    with torch.no_grad():  # 最后的 LayerNorm 输出恒为全 1 向量，输出层里结束符那一行也是全 1：它的 logit 远大于其他 token
        eos_model.final_norm.scale.zero_()
        eos_model.final_norm.shift.fill_(1.0)
        eos_model.out_head.weight[EOT_ID] = 1.0
    paths = {"ch05-base": folder / "ch05_gpt_tiny.safetensors", "ch06-instruct": folder / "ch06_instruct_tiny.safetensors",
             "eos": folder / "eos.safetensors", "long": folder / "long.safetensors"}
    save_checkpoint(paths["ch05-base"], tiny_gpt(1))
    save_checkpoint(paths["ch06-instruct"], tiny_gpt(2), extra={"base_model": "ch05"})
    save_checkpoint(paths["eos"], eos_model)
    save_checkpoint(paths["long"], tiny_gpt(4, LONG_CONTEXT))
    return paths


def server_env(checkpoints):
    folder = checkpoints["ch05-base"].parent
    return dict(os.environ, LLM_CHECKPOINT_DIR=str(folder), LLM_PROFILE="tiny", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def server(checkpoints):
    args = ["--model", "ch05-base", "--model", "ch06-instruct", "--model", f"eos={checkpoints['eos']}",
            "--model", f"long={checkpoints['long']}", "--max-tokens-limit", str(LIMIT),
            "--max-body-bytes", str(BODY_LIMIT), "--device", "cpu"]
    with ServerProcess(*args, env=server_env(checkpoints)) as process:
        yield process


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: load_model(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def expected_text(model, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0):
    """同样的请求在测试进程里直接调用 generate：结束符之前的新 token 解码成文字。"""
    ids = TOKENIZER.encode(prompt)
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=temperature, top_p=top_p, eos_id=EOT_ID,
                   generator=torch.Generator().manual_seed(seed))[0, len(ids):].tolist()
    return TOKENIZER.decode(out[:out.index(EOT_ID)] if EOT_ID in out else out)


def instruct_prompt(question):
    return format_prompt({"instruction": question, "input": ""})


def stream_text(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0, seed=5), dict(temperature=0.7, top_p=0.8, seed=11)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "temperature", "top-p"])
def test_chat_plain_and_streamed_equal_generate(client, models, sampling):
    request = dict(model="ch06-instruct", messages=[{"role": "user", "content": QUESTION}], max_tokens=40, **sampling)
    expected = expected_text(models["ch06-instruct"], instruct_prompt(QUESTION), 40, sampling["temperature"],
                             sampling.get("top_p", 1.0), sampling.get("seed", 0))
    reply = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 40 and reply.usage.prompt_tokens == len(TOKENIZER.encode(instruct_prompt(QUESTION)))
    assert stream_text(chunks) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40


def test_completions_plain_and_streamed_equal_generate(client, models):
    prompt = "Once upon a time"
    expected = expected_text(models["ch05-base"], prompt, 30, 1.0, 1.0, 3)
    reply = client.completions.create(model="ch05-base", prompt=prompt, max_tokens=30, temperature=1.0, seed=3)
    chunks = list(client.completions.create(model="ch05-base", prompt=prompt, max_tokens=30, temperature=1.0, seed=3,
                                            stream=True))
    assert reply.choices[0].text == expected
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert reply.object == "text_completion"


def test_stop_sequence_cuts_the_answer(client, models):
    full = expected_text(models["ch05-base"], "Hello", 40, 1.0, 1.0, 9)
    stop = full[15:18]  # 取自回答中间的一段文字，可能跨越 token 边界
    expected = full[:full.index(stop)]
    kwargs = dict(model="ch05-base", prompt="Hello", max_tokens=40, temperature=1.0, seed=9, stop=[stop, "never appears"])
    reply = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_end_of_text_token_ends_the_answer(client):
    reply = client.chat.completions.create(model="eos", messages=[{"role": "user", "content": "Hi"}], max_tokens=10)
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 0


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "ch05-base", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], "流应以 data: [DONE] 和一个空行结束"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_models_endpoint(client):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"ch05-base", "ch06-instruct", "eos", "long"}
    assert listed["long"].context_length == LONG_CONTEXT


def prompt_tokens(question):
    return len(TOKENIZER.encode(instruct_prompt(question)))


LONG_QUESTION = "word " * 150  # 每个 " word" 一个 token：比上下文长


def bad_requests():
    """(说明, 请求体, 状态码, 错误信息的正则)。期望的超出量由测试自己数 token 算出。"""
    chat = {"model": "ch06-instruct", "messages": [{"role": "user", "content": QUESTION}]}
    over = prompt_tokens(LONG_QUESTION) - CONTEXT + 1
    over_with_answer = prompt_tokens(QUESTION) + LIMIT - CONTEXT
    return [
        ("unknown model", {**chat, "model": "gpt-5"}, 404, "没有名为 \"gpt-5\" 的模型；本服务提供：ch05-base"),
        ("missing model", {"messages": chat["messages"]}, 404, "没有名为 null 的模型"),
        ("empty messages", {**chat, "messages": []}, 400, "messages 不能为空"),
        ("messages not a list", {**chat, "messages": "hi"}, 400, "messages 不能为空"),
        ("bad role", {**chat, "messages": [{"role": "robot", "content": "hi"}]}, 400, r"messages\[0\] 的 role"),
        ("last not user", {**chat, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         400, "最后一条消息应来自 user"),
        ("bad content", {**chat, "messages": [{"role": "user", "content": 3}]}, 400, r"messages\[0\]\.content"),
        ("prompt too long", {**chat, "messages": [{"role": "user", "content": LONG_QUESTION}]}, 400,
         f"上下文长度是 {CONTEXT}.*缩短至少 {over} 个 token"),
        ("prompt + max_tokens too long", {**chat, "max_tokens": LIMIT}, 400,
         f"超出上下文长度 {CONTEXT} 共 {over_with_answer} 个 token"),
        ("max_tokens 0", {**chat, "max_tokens": 0}, 400, "max_tokens 应为正整数，收到 0"),
        ("max_tokens negative", {**chat, "max_tokens": -5}, 400, "max_tokens 应为正整数，收到 -5"),
        ("max_tokens over limit", {**chat, "max_tokens": LIMIT + 1}, 400, f"max_tokens 最多为 {LIMIT}"),
        ("max_completion_tokens over limit", {**chat, "max_completion_tokens": 10_000}, 400, "max_completion_tokens 最多为"),
        ("max_tokens not int", {**chat, "max_tokens": 2.5}, 400, "参数 max_tokens 应为整数"),
        ("temperature too high", {**chat, "temperature": 2.5}, 400, r"temperature 应在 \[0, 2\] 之间.*收到 2.5"),
        ("temperature negative", {**chat, "temperature": -0.1}, 400, r"temperature 应在 \[0, 2\] 之间"),
        ("temperature string", {**chat, "temperature": "hot"}, 400, "参数 temperature 应为数"),
        ("top_p zero", {**chat, "top_p": 0}, 400, r"top_p 应在 \(0, 1\] 之间，收到 0"),
        ("top_p too high", {**chat, "top_p": 1.5}, 400, r"top_p 应在 \(0, 1\] 之间"),
        ("too many stops", {**chat, "stop": ["a", "b", "c", "d", "e"]}, 400, "最多 4 个字符串"),
        ("negative seed", {**chat, "seed": -1}, 400, "seed 应在"),
        ("n = 2", {**chat, "n": 2}, 400, "n 只能为 1"),
        ("stream not bool", {**chat, "stream": "yes"}, 400, "参数 stream 应为布尔值"),
    ]


@pytest.mark.parametrize("what, body, status, message", bad_requests(), ids=[r[0] for r in bad_requests()])
def test_bad_chat_requests_get_openai_errors(server, what, body, status, message):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert re.search(message, error["message"]), error["message"]


@pytest.mark.parametrize("what, content, status, message", [
    ("malformed JSON", b'{"model": ', 400, "请求体不是合法的 JSON"),
    ("not an object", b"[1, 2]", 400, r"请求体应为 JSON 对象"),
    ("not UTF-8", b"\xff\xfe", 400, "请求体不是合法的 JSON"),
    ("oversized body", b" " * (BODY_LIMIT + 1), 413, f"请求体有 {BODY_LIMIT + 1} 字节，超过上限 {BODY_LIMIT} 字节"),
    ("no Content-Length", iter([b'{"model": "ch05-base", ', b'"prompt": "hi"}']), 411, "Content-Length"),
])
def test_bad_bodies_get_openai_errors(server, what, content, status, message):
    response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert re.search(message, response.json()["error"]["message"])


def test_bad_completion_prompt_and_unknown_paths(server, client):
    with pytest.raises(openai.BadRequestError, match="prompt 应为非空字符串"):
        client.completions.create(model="ch05-base", prompt="", max_tokens=5)
    with pytest.raises(openai.NotFoundError, match="本服务提供：ch05-base、ch06-instruct、eos、long"):
        client.completions.create(model="nope", prompt="Hi", max_tokens=5)
    assert httpx.get(f"{server.url}/v1/nothing", timeout=TIMEOUT).json()["error"]["message"] == "Not Found"
    assert httpx.get(f"{server.url}/v1/chat/completions", timeout=TIMEOUT).status_code == 405


def ask(client, i, models):
    """第 i 个客户端：偶数不流式、奇数流式；各用不同的问题和种子。返回 (回答, 期望的回答)。"""
    question = f"Write a sentence about the number {i}."
    kwargs = dict(model="ch06-instruct", messages=[{"role": "user", "content": question}], max_tokens=30,
                  temperature=1.0, seed=100 + i)
    if i % 2:
        answer = stream_text(client.chat.completions.create(**kwargs, stream=True))
    else:
        answer = client.chat.completions.create(**kwargs).choices[0].message.content
    return answer, expected_text(models["ch06-instruct"], instruct_prompt(question), 30, 1.0, 1.0, 100 + i)


def test_twenty_concurrent_clients_get_their_own_answers(client, models):
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: ask(client, i, models), range(20)))
    assert [answer == expected for answer, expected in results] == [True] * 20
    assert len({answer for answer, _ in results}) == 20, "不同的请求应得到不同的回答"


def test_client_disconnect_frees_the_worker(server, client):
    body = {"model": "long", "prompt": "Hello", "max_tokens": LIMIT, "temperature": 1.0, "seed": 1,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # 收到第一个块后断开
    reply = client.completions.create(model="ch05-base", prompt="Hi", max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"  # 工作线程接着处理了下一个请求
    deadline = time.monotonic() + TIMEOUT
    while not (log := [line for line in server.lines if line.startswith("[serve] long:")]):
        assert time.monotonic() < deadline, "服务没有记录被断开的请求"
        time.sleep(0.05)
    generated = int(log[0].split("generated ")[1].split(",")[0])
    assert "finish=cancelled" in log[0] and generated < LIMIT, log[0]


def test_api_key_and_clean_shutdown(checkpoints):
    process = ServerProcess("--model", "ch05-base", "--api-key", "s3cret", "--device", "cpu",
                            env=server_env(checkpoints))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{process.url}/v1/models", headers=headers, timeout=TIMEOUT)
            assert response.status_code == 401
            assert "API 密钥不对或缺少" in response.json()["error"]["message"]
        keyed = openai.OpenAI(base_url=process.url + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert keyed.completions.create(model="ch05-base", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(process.url + "/", timeout=TIMEOUT).status_code == 200  # 页面本身不需要密钥
    finally:
        code = process.stop()
    assert code == 0
    assert process.lines[-1] == "服务已停止"
    assert not any("Traceback" in line or "ERROR" in line for line in process.lines), process.lines


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shared.serve", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_refuses_remote_host_without_flag_and_unknown_models(checkpoints):
    refused = run_cli("--model", "ch05-base", "--host", "0.0.0.0", env=server_env(checkpoints))
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
    unknown = run_cli("--model", "no-such-model", env=server_env(checkpoints))
    assert unknown.returncode == 1 and "未知的模型 'no-such-model'" in unknown.stderr
    missing = run_cli("--model", "ch06-instruct", env=dict(server_env(checkpoints), LLM_PROFILE="cpu"))
    assert missing.returncode == 1 and "先运行 06_finetuning/02_instruction.ipynb" in missing.stderr


# ---- 在本进程里检查的零件 ----

def test_chat_messages_map_onto_the_alpaca_template():
    turns = check_messages([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]},
                            {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}])
    assert alpaca_entry(turns) == {"instruction": "Another?", "input": "Be brief.\nUser: Name a color.\nAssistant: Red."}


def test_text_stream_holds_back_half_characters_and_stop_prefixes():
    ids = TOKENIZER.encode("你好 #1 ##2")
    stream = TextStream(TOKENIZER.decode, stop=["##"])
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) == "你好 #1 " and stream.stopped and stream.finish() == ""
    assert not any("\ufffd" in d for d in deltas), "半个汉字不应发出去"
    random_ids = torch.randint(0, EOT_ID, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = TextStream(TOKENIZER.decode)
    assert "".join(stream.push(t) for t in random_ids) + stream.finish() == TOKENIZER.decode(random_ids)


def test_hf_directories_load(tmp_path, models):
    transformers = pytest.importorskip("transformers")



    gpt2_dir = export_gpt2_to_hf(models["ch05-base"], tmp_path / "gpt2")
    served = load_served_model(f"mine={gpt2_dir}")
    ids = torch.tensor([TOKENIZER.encode("Hello there")])
    assert torch.equal(generate(served.model, ids, 8), generate(models["ch05-base"], ids, 8))
    assert served.chat_prompt([("user", "a"), ("user", "b")]) == "a\n\nb" and served.eos_id == EOT_ID

    tokenizer_dir = available(lambda: add_gpt2_tokenizer(tmp_path / "tokenizer"))
    qwen_dir = tmp_path / "qwen3"
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    hf_model = transformers.Qwen3ForCausalLM(config).eval()
    hf_model.save_pretrained(qwen_dir)
    tok = transformers.GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(qwen_dir)
    served = load_served_model(f"qwen={qwen_dir}")
    assert served.chat_prompt([("user", "Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert served.context_length == 64 and served.eos_id == EOT_ID
    ids = torch.tensor([served.encode("Hello there")])
    with torch.no_grad():
        reference = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(served.model, ids, 8), reference)


# ---- 真正的浏览器 ----

def need_chromium():
    if find_chromium() is None:
        pytest.skip("没有找到 Chromium，跳过浏览器测试。安装：apt-get install -y chromium（Debian / Ubuntu）")


def test_browser_page_streams_the_answer_into_the_dom(server, models):
    need_chromium()
    page = chat_in_browser(server.url + "/", QUESTION, timeout=TIMEOUT,
                           fields={"model": "ch06-instruct", "temperature": "0", "max-tokens": "40"})
    assert page["error"] is None
    assert page["answer"] == expected_text(models["ch06-instruct"], instruct_prompt(QUESTION), 40)
    assert page["updates"] >= 5, "回答应一段一段地写进 DOM（流式），而不是一次写完"


def test_browser_page_shows_server_errors(server):
    need_chromium()
    page = chat_in_browser(server.url + "/", QUESTION, timeout=TIMEOUT, fields={"model": "ch06-instruct", "max-tokens": "0"})
    assert page["answer"] is None, "出错时这一轮应被撤回"
    assert page["error"].startswith("请求失败：400：max_tokens 应为正整数")
