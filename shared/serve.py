"""和你的模型聊天：OpenAI 兼容的 HTTP 服务（FastAPI + uvicorn，GET /v1/models、POST /v1/chat/completions、
POST /v1/completions，支持 SSE 流式输出）与同一服务提供的网页聊天界面（shared/chat.html），
在 06_finetuning/bonus_chat_server 中讲解。启动：``python -m shared.serve --model ch06-instruct --port 8000``。"""
import argparse
import asyncio
import base64
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .checkpoint import ch05_checkpoint_path, load_model, read_checkpoint_metadata
from .download import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, download
from .generate import generate, text_to_token_ids
from .gpt2_weights import find_gpt2_dir, load_gpt2
from .instruct import format_prompt, instruct_checkpoint_path
from .llama import load_llama
from .qwen3 import find_qwen3, load_qwen3
from .runtime import REPO_ROOT, atomic_write, get_device
from .tokenizer import EOT_ID, get_gpt2_tokenizer

# ==== 以下内容由 `python -m shared.export` 从笔记本的 #@save 单元格生成，请勿直接修改 ====


# ---- 06_finetuning/bonus_chat_server.ipynb ----
class APIError(Exception):
    """变成 OpenAI 格式错误响应的异常：HTTP 状态码 status，响应体 {"error": {"message", "type", "param", "code"}}。"""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        kind = "server_error" if self.status >= 500 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


ROLES = ("system", "user", "assistant")


def message_text(message, i):
    """第 i 条消息的文字：content 可以是字符串，也可以是 [{"type": "text", "text": ...}, ...]。"""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content 应为字符串或文本片段列表 [{{\"type\": \"text\", \"text\": ...}}]", "messages")


def check_messages(messages):
    """校验 OpenAI 格式的 messages，返回 [(角色, 文字), ...]。"""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages 不能为空：至少要有一条 {\"role\": \"user\", \"content\": ...}", "messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] 的 role 应为 {'、'.join(ROLES)} 之一", "messages")
        turns.append((message["role"], message_text(message, i)))
    if turns[-1][0] != "user":
        raise APIError(400, "最后一条消息应来自 user：模型要回答的就是它", "messages")
    return turns


def alpaca_entry(turns):
    """对话 -> 第 6 章的 Alpaca 样本：最后一条用户消息是 instruction，系统提示与之前的对话是 input（上下文）。"""
    *history, (_, instruction) = turns
    context = "\n".join(text if role == "system" else f"{role.capitalize()}: {text}" for role, text in history)
    return {"instruction": instruction, "input": context}


def alpaca_chat_prompt(turns):
    """指令模型的提示词：Alpaca 模板，以 "### Response:" 结尾，回答从这里开始续写。"""
    return format_prompt(alpaca_entry(turns))


def plain_chat_prompt(turns):
    """基础模型没学过对话格式：各条消息的文字按顺序接起来，让它续写。"""
    return "\n\n".join(text for _, text in turns)


@dataclass
class ServedModel:
    """服务中的一个模型：网络、分词 (encode: 文字 -> id 列表，decode: id 列表 -> 文字)、结束符、
    把 [(角色, 文字), ...] 变成提示词的 chat_prompt，以及上下文长度。"""
    name: str
    model: torch.nn.Module
    encode: Callable
    decode: Callable
    eos_id: int
    chat_prompt: Callable
    context_length: int


def gpt2_served(name, model, chat_prompt):
    """用 GPT-2 分词器（tiktoken）的课程 GPTModel。"""
    tok = get_gpt2_tokenizer()
    return ServedModel(name, model, lambda text: text_to_token_ids(text, tok)[0].tolist(), tok.decode, EOT_ID,
                       chat_prompt, model.cfg["context_length"])


def course_served(name, path, device):
    """save_checkpoint 保存的课程模型；save_instruct_model 保存的（元数据里有 base_model）是指令模型，套 Alpaca 模板。"""
    instruct = "base_model" in read_checkpoint_metadata(path)["extra"]
    return gpt2_served(name, load_model(path, device), alpaca_chat_prompt if instruct else plain_chat_prompt)


def hf_served(name, folder, device):
    """Hugging Face 格式的目录（config.json + safetensors）：GPT-2 用课程的 GPTModel，Llama / Qwen3 用第 5 章选读的实现，
    分词器用目录里的 tokenizer.json（有对话模板时用它渲染对话）。"""
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == "gpt2":
        return gpt2_served(name, load_gpt2(local_dir=folder, device=device)[0], plain_chat_prompt)
    loaders = {"llama": load_llama, "qwen3": load_qwen3, "qwen3_moe": load_qwen3}
    if model_type not in loaders:
        raise ValueError(f"{folder.name}：不支持 model_type={model_type!r}（支持 gpt2、{'、'.join(loaders)}）")
    from transformers import AutoTokenizer
    model, cfg = loaders[model_type](folder, device=device)
    tok = AutoTokenizer.from_pretrained(folder)

    def encode(text):  # 对话模板已经带了开头的 BOS，不要再加一个
        return tok.encode(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))

    def chat_prompt(turns):
        messages = [{"role": role, "content": text} for role, text in turns]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return ServedModel(name, model, encode, tok.decode, tok.eos_token_id,
                       chat_prompt if tok.chat_template else plain_chat_prompt, cfg["context_length"])


PRESETS = {  # 预设名 -> (找到权重的函数, 找不到时的提示)
    "ch05-base": (ch05_checkpoint_path, "先运行 05_pretraining/01_pretraining.ipynb"),
    "ch06-instruct": (instruct_checkpoint_path, "先运行 06_finetuning/02_instruction.ipynb"),
    "gpt2": (lambda: find_gpt2_dir("gpt2"), "设置 LLM_ALLOW_DOWNLOAD=1 后运行 05_pretraining/01_pretraining.ipynb 下载"),
    "gpt2-medium": (lambda: find_gpt2_dir("gpt2-medium"), "放进 Hugging Face 缓存，或用 名字=目录"),
    "qwen3-0.6b": (lambda: find_qwen3("0.6B"), "见 05_pretraining/bonus_qwen3.ipynb"),
}


def load_served_model(spec, device="cpu"):
    """--model 的参数 -> ServedModel。spec 是 PRESETS 里的预设名，或 "名字=路径"（课程检查点文件或 HF 格式目录）。"""
    name, _, path = spec.partition("=")
    if not path:
        if name not in PRESETS:
            raise ValueError(f"未知的模型 {name!r}：可选 {'、'.join(PRESETS)}，或写成 名字=路径")
        find, hint = PRESETS[name]
        path = find()
        if path is None or not Path(path).exists():
            raise FileNotFoundError(f"模型 {name} 的权重不在本机（{hint}）")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"模型 {name}：找不到 {path}")
    return hf_served(name, path, device) if path.is_dir() else course_served(name, path, device)


class TextStream:
    """把逐个生成的 token 变成可以立即发送的文字增量（已发送的文字永远不会被收回）：
    末尾是半个字符（解码成 "\ufffd"）或可能是某个停止串的开头时先扣下；出现完整的停止串时截断在它之前，stopped 变为 True。"""

    def __init__(self, decode, stop=()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids, self.sent, self.stopped = [], "", False

    def push(self, token_id):
        """加入一个 token，返回新增的可发送文字（可能是空串）。"""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return self._emit(text[:min(cuts)])
        text = text.rstrip("\ufffd")
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[:len(text) - held])

    def finish(self):
        """生成结束：发出扣下的部分（停止串除外）。"""
        return "" if self.stopped else self._emit(self.decode(self.ids))

    def _emit(self, text):
        delta, self.sent = text[len(self.sent):], text
        return delta


class Job:
    """排队等模型的一个请求。run() 在唯一的模型工作线程里调用 generate，每个 token 经 TextStream 变成文字增量，
    放进这个请求自己的 asyncio 队列；cancel（客户端断开）后，下一个 token 就停止生成。"""

    def __init__(self, served, prompt_ids, params, loop):
        self.served, self.prompt_ids, self.params, self.loop = served, prompt_ids, params, loop
        self.events, self.cancelled = asyncio.Queue(), threading.Event()
        self.text = TextStream(served.decode, params["stop"])
        self.n_tokens, self.finish_reason = 0, "length"

    def put(self, item):
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def on_token(self, next_id):
        """generate 每生成一个 token 调用一次；返回 True 时 generate 提前停止。"""
        token = int(next_id[0, 0])
        if token == self.served.eos_id:
            self.finish_reason = "stop"
            return True
        self.n_tokens += 1
        if delta := self.text.push(token):
            self.put(delta)
        if self.text.stopped:
            self.finish_reason = "stop"
        return self.text.stopped or self.cancelled.is_set()

    def run(self):
        """在模型工作线程里执行；结束时放入 None（出错时先放入异常）。"""
        start, p = time.perf_counter(), self.params
        try:
            if not self.cancelled.is_set():
                model = self.served.model
                device = next(model.parameters()).device
                idx = torch.tensor([self.prompt_ids], device=device)
                generator = torch.Generator(device).manual_seed(p["seed"])
                generate(model, idx, p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                         eos_id=self.served.eos_id, generator=generator, on_token=self.on_token)
                if rest := self.text.finish():
                    self.put(rest)
        except Exception as error:  # 交给请求的协程，变成错误响应
            self.put(error)
        reason = "cancelled" if self.cancelled.is_set() else self.finish_reason
        print(f"[serve] {self.served.name}: prompt {len(self.prompt_ids)} tokens, generated {self.n_tokens}, "
              f"finish={reason}, {time.perf_counter() - start:.2f} s", flush=True)
        self.put(None)

    async def pieces(self):
        """依次给出文字增量。协程被取消（客户端断开）或提前退出时设置 cancelled，让工作线程停下。"""
        try:
            while (item := await self.events.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancelled.set()


KIND_NAMES = {bool: "布尔值 true / false", int: "整数", float: "数", str: "字符串", list: "列表", dict: "对象"}


def typed(body, name, kinds, default=None):
    """body[name]；没有或为 null 时返回 default，类型不对时报 400。kinds 是类型或类型元组（bool 不算数字）。"""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "或".join(KIND_NAMES[k] for k in kinds if not (k is int and float in kinds))  # (int, float) 就是“数”
        raise APIError(400, f"参数 {name} 应为{names}，收到 {json.dumps(value, ensure_ascii=False)}", name)
    return value


def sampling_params(body, served, prompt_len, max_tokens_limit):
    """检查采样参数，返回 generate 要用的 dict；提示词与回答装不下上下文时说明超出多少个 token。"""
    context, param = served.context_length, "messages" if "messages" in body else "prompt"
    if prompt_len >= context:
        raise APIError(400, f"提示词有 {prompt_len} 个 token，模型 {served.name} 的上下文长度是 {context}，还要给回答留位置："
                            f"请把提示词缩短至少 {prompt_len - context + 1} 个 token", param, "context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = typed(body, name, int, min(max_tokens_limit, context - prompt_len))
    if max_tokens <= 0:
        raise APIError(400, f"{name} 应为正整数，收到 {max_tokens}", name)
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"{name} 最多为 {max_tokens_limit}（服务的 --max-tokens-limit），收到 {max_tokens}", name)
    if prompt_len + max_tokens > context:
        raise APIError(400, f"提示词 {prompt_len} 个 token + {name} {max_tokens} 超出上下文长度 {context} 共 "
                            f"{prompt_len + max_tokens - context} 个 token：请减小 {name} 或缩短提示词", name,
                       "context_length_exceeded")
    temperature = typed(body, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature 应在 [0, 2] 之间（0 表示贪心解码），收到 {temperature}", "temperature")
    top_p = typed(body, "top_p", (int, float), 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p 应在 (0, 1] 之间，收到 {top_p}", "top_p")
    stop = typed(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop 应为一个字符串，或最多 4 个字符串组成的列表", "stop")
    seed = typed(body, "seed", int, None)
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"seed 应在 [0, 2^63) 之间，收到 {seed}", "seed")
    if typed(body, "n", int, 1) != 1:
        raise APIError(400, "本服务一次只生成一个回答：n 只能为 1", "n")
    include_usage = typed(typed(body, "stream_options", dict, {}), "include_usage", bool, False)
    return dict(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stop,
                seed=secrets.randbits(63) if seed is None else seed, stream=typed(body, "stream", bool, False),
                include_usage=include_usage)


CHAT_PAGE = REPO_ROOT / "shared" / "chat.html"  # 就在 shared 包里（pyproject.toml 把它列为包数据）


def choice(chat, text, finish_reason, stream):
    """回答（stream=False）或流式块里的一个 choice；chat 区分对话接口 (message / delta) 与补全接口 (text)。"""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    message = {} if text is None else {"content": text}
    if not stream:
        message = {"role": "assistant", **message}
    return {"index": 0, "delta" if stream else "message": message, "logprobs": None, "finish_reason": finish_reason}


def envelope(chat, header, choices, stream=True, usage=None):
    """OpenAI 格式的响应体或流式块：header 是 {"id", "created", "model"}。"""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {**header, "object": kind, "choices": choices, **({"usage": usage} if usage else {})}


async def sse_events(job, chat, header, usage):
    """流式响应的各个事件：（对话接口先发角色）文字增量 -> 带 finish_reason 的块 -> （要求时）用量。"""
    if chat:
        yield envelope(chat, header, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}])
    try:
        async for piece in job.pieces():
            yield envelope(chat, header, [choice(chat, piece, None, True)])
        yield envelope(chat, header, [choice(chat, None, job.finish_reason, True)])
        if job.params["include_usage"]:
            yield envelope(chat, header, [], usage=usage(job))
    except Exception as error:  # 响应头已经发出，只能在流里报告错误
        yield APIError(500, f"生成时出错：{error}").body()


async def sse(events):
    async for event in events:
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(models, api_key=None, max_tokens_limit=1024, max_body_bytes=1_000_000):
    """OpenAI 兼容的 FastAPI 应用。models 是 {名字: ServedModel}；所有生成请求排进同一个模型工作线程的队列。"""
    app = FastAPI(title="Notes-For-LLM chat server")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, error):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):  # 404 路径不存在、405 方法不对等，也用 OpenAI 的格式
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, error):
        return JSONResponse(APIError(500, f"服务内部错误：{type(error).__name__}").body(), status_code=500)

    async def guard(request: Request):
        """读请求体之前：检查 API 密钥与请求体大小。"""
        if api_key and not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                                  f"Bearer {api_key}".encode()):
            raise APIError(401, "API 密钥不对或缺少：请求头应为 Authorization: Bearer <密钥>（服务启动时的 --api-key）",
                           code="invalid_api_key")
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                raise APIError(411, "请求需要 Content-Length 头（本服务不接受分块上传的请求体）")
            if int(length) > max_body_bytes:
                raise APIError(413, f"请求体有 {int(length)} 字节，超过上限 {max_body_bytes} 字节", code="request_too_large")

    async def read_json(request):
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise APIError(400, f"请求体不是合法的 JSON：{error}") from None
        if not isinstance(body, dict):
            raise APIError(400, "请求体应为 JSON 对象 {...}")
        return body

    def pick_model(body):
        name = body.get("model")
        if not isinstance(name, str) or name not in models:
            raise APIError(404, f"没有名为 {json.dumps(name, ensure_ascii=False)} 的模型；本服务提供：{'、'.join(models)}",
                           "model", "model_not_found")
        return models[name]

    def usage(job):
        prompt = len(job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": job.n_tokens, "total_tokens": prompt + job.n_tokens}

    async def respond(body, served, prompt_ids, chat):
        params = sampling_params(body, served, len(prompt_ids), max_tokens_limit)
        loop = asyncio.get_running_loop()
        job = Job(served, prompt_ids, params, loop)
        loop.run_in_executor(worker, job.run)
        header = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                  "model": served.name}
        if params["stream"]:
            return StreamingResponse(sse(sse_events(job, chat, header, usage)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = "".join([piece async for piece in job.pieces()])
        return envelope(chat, header, [choice(chat, text, job.finish_reason, False)], stream=False, usage=usage(job))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "notes-for-llm",
                                            "context_length": m.context_length} for name, m in models.items()]}

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat_completions(request: Request):
        body = await read_json(request)
        served = pick_model(body)
        return await respond(body, served, served.encode(served.chat_prompt(check_messages(body.get("messages")))), True)

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(request: Request):
        body = await read_json(request)
        served = pick_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt 应为非空字符串", "prompt")
        return await respond(body, served, served.encode(prompt), False)

    return app


READY = "服务地址："


def is_loopback(host):
    """host 是否只有本机能访问（localhost、127.0.0.0/8、::1）。"""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # 主机名
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m shared.serve", description="OpenAI 兼容的聊天服务（网页聊天界面在 /，API 在 /v1）")
    parser.add_argument("--model", action="append", required=True, metavar="名字[=路径]",
                        help=f"要服务的模型，可重复：预设 {'、'.join(PRESETS)}，或 名字=课程检查点文件/HF 目录")
    parser.add_argument("--host", default="127.0.0.1", help="监听地址，默认只有本机能访问")
    parser.add_argument("--port", type=int, default=8000, help="端口；0 表示由系统挑一个空闲端口")
    parser.add_argument("--allow-remote", action="store_true", help="允许绑定 127.0.0.1 以外的地址")
    parser.add_argument("--api-key", help="要求请求带上 Authorization: Bearer <密钥>")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="一次最多生成多少个 token")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="请求体的大小上限")
    parser.add_argument("--device", help="cpu / cuda / mps，默认自动选择")
    args = parser.parse_args(argv)
    remote = not is_loopback(args.host)
    if remote and not args.allow_remote:
        parser.error(f"--host {args.host} 会让别的机器也能访问本服务；确实需要时再加上 --allow-remote")
    if remote:
        print(f"警告：服务监听 {args.host}，网络上的其他机器都能访问它"
              f"{'' if args.api_key else '，而且没有设置 --api-key'}", file=sys.stderr, flush=True)
    models = {}
    for spec in args.model:
        try:
            served = load_served_model(spec, get_device(args.device))
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"无法载入模型：{error}")
        models[served.name] = served
        print(f"已载入模型 {served.name}（上下文长度 {served.context_length}）", flush=True)
    app = create_app(models, args.api_key, args.max_tokens_limit, args.max_body_bytes)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # 从这里起连接就会排队等待，不会被拒绝
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{READY}http://{host}:{sock.getsockname()[1]}（网页聊天界面在 /，API 在 /v1）", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn 正常关闭后会重新发出它收到的 SIGINT
        pass
    print("服务已停止", flush=True)


class ServerProcess:
    """在子进程里运行 python -m shared.serve --port 0 *args，等它打印出地址（.url）；.lines 是它到目前为止的输出。
    stop() 发 SIGINT（相当于 Ctrl+C）让它正常退出，timeout 秒内没退出就强制结束，返回退出码。也可以用作 with 语句。"""

    def __init__(self, *args, timeout=120, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "shared.serve", "--port", "0", *args], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
        self.lines, self.url, ready = [], None, threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError("服务没有启动：\n" + "\n".join(self.lines[-20:]))

    def _read(self, ready):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.url is None and (m := re.search(rf"{READY}(http://\S+?)（", line)):
                self.url = m.group(1)
                ready.set()
        ready.set()  # 子进程结束了（例如启动失败）

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def find_chromium():
    """本机的 Chromium / Chrome 可执行文件的路径；没有时返回 None。"""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    return next((path for path in map(shutil.which, names) if path), None)


BROWSER_SCRIPT = """(async () => {
  const deadline = Date.now() + %(timeout)d;
  const until = async (ok, what) => {
    while (!ok()) {
      if (Date.now() > deadline) throw new Error("timeout waiting for " + what);
      await new Promise(r => setTimeout(r, 50));
    }
  };
  const $ = (id) => document.getElementById(id);
  await until(() => $("model").options.length > 0, "model list");
  for (const [id, value] of Object.entries(%(fields)s)) $(id).value = value;
  let updates = 0;
  new MutationObserver(records => { updates += records.length; })
    .observe($("log"), {childList: true, subtree: true, characterData: true});
  $("input").value = %(message)s;
  $("send").click();
  await until(() => !$("send").disabled, "the answer");
  const answers = document.querySelectorAll(".msg.assistant .text");
  return {answer: answers.length ? answers[answers.length - 1].textContent : null, updates,
          error: $("error").hidden ? null : $("error").textContent};
})()"""


def chat_in_browser(url, message, fields=None, screenshot=None, timeout=60):
    """用无头 Chromium 打开聊天页面 url，按 fields（{元素 id: 值}，例如 {"temperature": "0"}）填写设置，发送 message，
    等回答流完。通过 DevTools 协议操作，返回 {"answer": 回答, "updates": 对话区 DOM 的改动次数, "error": 错误提示或 None}；
    给出 screenshot（路径）时把页面截图存成 PNG。"""
    from websockets.sync.client import connect  # 与浏览器的 DevTools 协议通信

    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("没有找到 Chromium：Debian / Ubuntu 上用 apt-get install -y chromium 安装")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1000,800",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("Chromium 没有启动 DevTools 端口")
                time.sleep(0.05)
            port = port_file.read_text().split()[0]
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            with connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None,
                         open_timeout=timeout) as ws:
                def call(method, **params):
                    call.id = getattr(call, "id", 0) + 1
                    ws.send(json.dumps({"id": call.id, "method": method, "params": params}))
                    while "id" not in (reply := json.loads(ws.recv(timeout))) or reply["id"] != call.id:
                        pass  # 跳过浏览器主动发来的事件
                    if "error" in reply:
                        raise RuntimeError(f"DevTools {method}: {reply['error']}")
                    return reply["result"]

                call("Page.navigate", url=url)
                ready = "document.readyState === 'complete' && document.getElementById('model') !== null"
                while not call("Runtime.evaluate", expression=ready, returnByValue=True)["result"].get("value"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("聊天页面没有打开")
                    time.sleep(0.05)
                script = BROWSER_SCRIPT % dict(timeout=timeout * 1000, fields=json.dumps(fields or {}),
                                               message=json.dumps(message))
                result = call("Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True)
                if "exceptionDetails" in result:
                    raise RuntimeError(f"页面脚本出错：{result['exceptionDetails'].get('exception', {}).get('description')}")
                if screenshot is not None:
                    png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
                    atomic_write(Path(screenshot), lambda tmp: Path(tmp).write_bytes(png))
                return result["result"]["value"]
        finally:
            os.killpg(proc.pid, signal.SIGKILL) if os.name == "posix" else proc.kill()
            proc.wait()


def add_gpt2_tokenizer(folder):
    """把 GPT-2 分词器放进 Hugging Face 格式的目录：官方的 encoder.json 就是 vocab.json，vocab.bpe 就是 merges.txt。
    之后 AutoTokenizer.from_pretrained(folder) 与 pipeline(model=folder) 都能直接读出分词器。返回 folder。"""
    for url, name in ((GPT2_ENCODER_JSON, "vocab.json"), (GPT2_VOCAB_BPE, "merges.txt")):
        atomic_write(Path(folder) / name, lambda tmp: shutil.copyfile(download(url), tmp))
    return folder


if __name__ == "__main__" and "get_ipython" not in globals():
    main()
