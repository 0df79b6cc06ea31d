"""数据下载：缓存、校验、原子写入，以及离线镜像。
- 文件缓存在 ``LLM_CACHE_DIR``（默认是仓库根目录下被 git 忽略的 ``.cache/downloads``），布局为 ``<缓存>/<主机名>/<URL 路径>``；
- 若设置了 ``LLM_MIRROR``，则从 ``<镜像>/<主机名>/<URL 路径（已解码）>`` 读取，完全不联网；
- 联网下载 huggingface.co 上的文件时，若设置了 ``HF_ENDPOINT``（例如国内镜像 ``https://hf-mirror.com``），
  改从那里下载；缓存与镜像里的位置仍按原始 URL，所以换不换镜像，找到的都是同一个文件；
- 已知的 sha256 与大小会被校验；先写入临时文件，校验通过后再改名，所以中途失败绝不会留下“看起来完整”的文件。"""
import hashlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .runtime import DOWNLOAD_CACHE_ENV, HF_ENDPOINT_ENV, MIRROR_ENV, REPO_ROOT, atomic_write, progress_bar

# 课程用到的数据集：URL -> (sha256, 字节数)。上游文件若更新，校验会失败并给出提示。
THE_VERDICT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
TINY_SHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_VOCAB_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_JSON = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
SMS_SPAM_ZIP = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
INSTRUCTION_DATA = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
PREFERENCE_DATA = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"
TANG_POEMS = "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/master/全唐诗/poet.tang.{start}.json"
WAIMAI_10K = "https://raw.githubusercontent.com/SophonPlus/ChineseNlpCorpus/master/datasets/waimai_10k/waimai_10k.csv"
HOTEL_REVIEWS = "https://raw.githubusercontent.com/SophonPlus/ChineseNlpCorpus/master/datasets/ChnSentiCorp_htl_all/ChnSentiCorp_htl_all.csv"

KNOWN_FILES = {
    THE_VERDICT: ("b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20479),
    TINY_SHAKESPEARE: ("86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394),
    GPT2_VOCAB_BPE: ("1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", 456318),
    GPT2_ENCODER_JSON: ("196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", 1042301),
    INSTRUCTION_DATA: ("7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203524),
    PREFERENCE_DATA: ("305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", 386968),
    WAIMAI_10K: ("b8b5c11c00b51578d35937fca56e03a126b45381f1ea4b22893237cb377a26fe", 919380),
    HOTEL_REVIEWS: ("1d414b9c65caf3a836abdb4efded621968502ad3338e1a9d885ae131c86083f0", 2904858),
}


class DownloadError(RuntimeError):
    """下载、镜像读取或校验失败。错误信息会说明 URL、镜像变量以及该怎么做。"""


def cache_dir():
    """下载缓存目录：``LLM_CACHE_DIR``，否则为仓库下的 ``.cache/downloads``。"""
    if os.environ.get(DOWNLOAD_CACHE_ENV):
        return Path(os.environ[DOWNLOAD_CACHE_ENV]).expanduser()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / ".cache" / "downloads"
    return Path.home() / ".cache" / "notes-for-llm"


def mirror_dir():
    """``LLM_MIRROR`` 指向的镜像目录；相对路径按仓库根目录解析。未设置时返回 None。"""
    value = os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def url_to_relpath(url):
    """``https://host/a%20b/c.txt`` -> ``host/a b/c.txt``（镜像与缓存共用的布局）。"""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"不是 http(s) URL：{url!r}")
    path = urllib.parse.unquote(parts.path).lstrip("/")
    if not path or ".." in Path(path).parts:
        raise ValueError(f"URL 路径不合法：{url!r}")
    return Path(parts.netloc) / path


def _help_text(url):
    return (f"\n  URL: {url}\n  怎么办：联网后重试；或者把文件放到镜像目录 <镜像>/{url_to_relpath(url).as_posix()}，"
            f"并设置环境变量 {MIRROR_ENV}=<镜像目录>（见 README 的“离线镜像”一节）。")


def verify_file(path, sha256=None, size=None):
    """校验文件非空，且（若已知）大小与 sha256 相符；不符时抛出 DownloadError。"""
    actual_size = path.stat().st_size
    if actual_size == 0:
        raise DownloadError(f"文件为空：{path.name}")
    if size is not None and actual_size != size:
        raise DownloadError(f"文件大小不符：{path.name} 有 {actual_size} 字节，应为 {size} 字节（文件被截断或已损坏）")
    if sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise DownloadError(f"sha256 不符：{path.name} 为 {digest[:16]}…，应为 {sha256[:16]}…（文件已损坏或被替换）")


def network_url(url):
    """实际联网下载用的地址：huggingface.co 的文件在设置了 HF_ENDPOINT 时改从它下载，其余不变。"""
    parts = urllib.parse.urlsplit(url)
    endpoint = os.environ.get(HF_ENDPOINT_ENV, "").strip().rstrip("/")
    if parts.netloc != "huggingface.co" or not endpoint:
        return url
    base = urllib.parse.urlsplit(endpoint)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise DownloadError(f"{HF_ENDPOINT_ENV}={endpoint!r} 不是 http(s) 地址，例如 https://hf-mirror.com")
    return urllib.parse.urlunsplit(parts._replace(scheme=base.scheme, netloc=base.netloc,
                                                  path=base.path.rstrip("/") + parts.path))


def _fetch_from_network(url, dest, timeout):
    parts = urllib.parse.urlsplit(network_url(url))
    quoted = urllib.parse.urlunsplit(parts._replace(path=urllib.parse.quote(urllib.parse.unquote(parts.path))))
    request = urllib.request.Request(quoted, headers={"User-Agent": "notes-for-llm"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(dest, "wb") as f, progress_bar(total=total, desc=url_to_relpath(url).name, unit="B",
                                                 unit_scale=True) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and dest.stat().st_size != total:
        raise DownloadError(f"下载中断：收到 {dest.stat().st_size} / {total} 字节")


def download(url, sha256=None, size=None, timeout=30):
    """返回 ``url`` 对应文件的本地路径：命中缓存则直接返回，否则从镜像或网络获取。
    对课程已知的数据集，sha256 与大小自动从 ``KNOWN_FILES`` 取得。"""
    known_sha, known_size = KNOWN_FILES.get(url, (None, None))
    sha256, size = sha256 or known_sha, size or known_size
    dest = cache_dir() / url_to_relpath(url)
    if dest.exists():
        try:
            verify_file(dest, sha256, size)
            return dest
        except DownloadError:
            dest.unlink()  # 缓存已损坏：删掉重新获取
    mirror = mirror_dir()

    def fetch(tmp):
        if mirror is not None:
            source = mirror / url_to_relpath(url)
            if not source.is_file():
                raise DownloadError(f"镜像中没有这个文件：{MIRROR_ENV} 指向的镜像里应有 {url_to_relpath(url).as_posix()}"
                                    f"（{MIRROR_ENV} 设置后不会联网）。" + _help_text(url))
            shutil.copyfile(source, tmp)
        else:
            try:
                _fetch_from_network(url, tmp, timeout)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise DownloadError(f"无法下载（{e}）。" + _help_text(url)) from e
        try:
            verify_file(tmp, sha256, size)
        except DownloadError as e:
            source_name = f"镜像 {MIRROR_ENV}" if mirror is not None else "网络"
            raise DownloadError(f"从{source_name}获得的文件未通过校验：{e}" + _help_text(url)) from None

    atomic_write(dest, fetch)  # 校验通过才改名：要么是完整文件，要么没有文件
    return dest


def read_text(url, **kwargs):
    """下载（或取缓存）并以 UTF-8 读取文本。"""
    return download(url, **kwargs).read_text(encoding="utf-8")
