"""GPT-2 分词器 (tokenizer) 的统一入口。
优先用 ``tiktoken.get_encoding("gpt2")``（它自己会读 ``TIKTOKEN_CACHE_DIR`` 缓存或联网）；
失败时改用下载助手获取 GPT-2 官方的 ``vocab.bpe`` 与 ``encoder.json``（支持 ``LLM_MIRROR`` 镜像），
两条路都走不通时给出清楚的说明。"""
import functools
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from .download import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, DownloadError, download
from .runtime import MIRROR_ENV, REPO_ROOT, TIKTOKEN_CACHE_ENV

EOT_ID = 50256  # <|endoftext|>：文档之间的分隔符、回答的结束符；GPT-2 没有专门的填充 token，也借它填充


@functools.lru_cache(maxsize=None)
def get_gpt2_tokenizer():
    """返回 GPT-2 的 ``tiktoken.Encoding``（词表 50257，``<|endoftext|>`` 的 id 为 50256）。"""
    value = os.environ.get(TIKTOKEN_CACHE_ENV)
    if value and not os.path.isabs(value):  # 笔记本的工作目录各不相同：相对路径按仓库根目录解析
        os.environ[TIKTOKEN_CACHE_ENV] = str((REPO_ROOT / value).resolve())
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as first_error:  # 网络与 tiktoken 缓存都不可用
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(download(GPT2_VOCAB_BPE)),
                                                    encoder_json_file=str(download(GPT2_ENCODER_JSON)))
            return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: EOT_ID})
        except Exception as second_error:
            raise DownloadError(f"无法加载 GPT-2 分词器：tiktoken 既不能联网也没有找到缓存（{type(first_error).__name__}: "
                                f"{first_error}），下载助手也失败了（{second_error}）。\n  怎么办：联网后重试；或设置 "
                                f"{TIKTOKEN_CACHE_ENV}=<含 tiktoken 缓存文件的目录>；或设置 {MIRROR_ENV}=<镜像目录>，"
                                "其中放有 GPT-2 的 vocab.bpe 与 encoder.json。") from second_error
