"""Adapter resolution: from the URI a user wrote to a safetensors file, its bytes and content hash.

No torch here: the producer checks adapters by reading the safetensors header, and the worker
turns the same bytes into tensors (workers/variants.py).
"""

import hashlib
import json
import math
import os
import re
import socket
import stat
import struct
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec
import numpy as np

from common.errors import AdapterError
from common.store import Store

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
# The largest magnitude a LoRA factor may hold: fp16's largest value. Real factors are far below 1;
# anything larger overflows half-precision weights or the fused product, and renders a black video.
MAX_ABS_FACTOR = 65504.0
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class ReadPolicy:
    """Where adapters may be read from, and how much and how long: every adapter read, at submit
    and on a worker, goes through one policy (docs/design.md: Trust)."""

    schemes: tuple[str, ...] = ("file", "s3", "gs", "hf")
    roots: tuple[str, ...] = ()  # local folders adapters may be read from; none: any local path
    max_bytes: int = 4096 * 2**20
    timeout_s: float = 20.0

    @classmethod
    def from_settings(cls, settings) -> "ReadPolicy":
        """The policy the settings describe (LORAFLEET_ADAPTER_SCHEMES, _ROOTS, _MAX_ADAPTER_MB, _READ_TIMEOUT_S)."""
        return cls(
            tuple(settings.adapter_schemes),
            tuple(os.path.realpath(os.path.expanduser(root)) for root in settings.adapter_roots),
            settings.max_adapter_mb * 2**20,
            settings.read_timeout_s,
        )

    def allows(self, url: str, store: Store | None = None) -> bool:
        """Whether a URL may be read: the store always; else an allowed scheme and, for a local
        file, a path under an allowed root (symbolic links followed first). It decides on the URL
        as fsspec opens it: schemes in any case (`FILE://` is a local file), and never a chained
        URL (`s3://b/k::file:///etc/passwd` opens the last one)."""
        if "::" in url:
            return False
        url = normalized(url)
        if store is not None and store.contains(url):
            return True
        path = local_path(url)
        if path is None:
            return url_scheme(url) in self.schemes
        real = os.path.realpath(path)
        return "file" in self.schemes and (
            not self.roots or any(real == root or real.startswith(root + os.sep) for root in self.roots)
        )

    def refusal(self, uri: str, what: str = "adapter") -> AdapterError:
        """The one error for anything outside the policy (it never says whether a file exists)."""
        roots = f"; local roots: {', '.join(self.roots)}" if self.roots else ""
        return AdapterError(
            f'{what} "{uri[:200]}" is outside the allowed locations (schemes: {", ".join(self.schemes)}{roots}; '
            "LORAFLEET_ADAPTER_SCHEMES, LORAFLEET_ADAPTER_ROOTS)"
        )


@dataclass(frozen=True)
class AdapterFile:
    """A resolved adapter: where its file is, its content hash and what its header declares."""

    url: str  # an fsspec URL any worker can read (absolute for local files)
    sha256: str  # of the file, and of the PEFT config beside it if there is one
    tensors: dict  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict
    config: dict | None = None  # a PEFT adapter_config.json found beside the file

    def config_alpha(self) -> float | None:
        """The lora_alpha of a PEFT config beside the file, if any; raises if it is not a positive number."""
        alpha = (self.config or {}).get("lora_alpha")
        if alpha is None:
            return None
        return checked_alpha(alpha, f"{PEFT_CONFIG_NAME} beside adapter {self.url}")

    def shapes(self) -> dict[str, list[int]]:
        """Each tensor's shape, by name."""
        return {name: info["shape"] for name, info in self.tensors.items()}

    def metadata_alpha(self) -> float | None:
        """The LoRA alpha the file's metadata declares (diffusers writes it), if any; raises if
        it is there but not a positive number."""
        where = f"adapter {self.url}: metadata"
        raw = self.metadata.get("lora_adapter_metadata")
        if raw:
            try:
                alpha = json.loads(raw).get("transformer.lora_alpha")
            except (ValueError, AttributeError, RecursionError):
                alpha = None
            if alpha is not None:
                return checked_alpha(alpha, where)
        alpha = self.metadata.get("lora_alpha") or self.metadata.get("alpha")
        return None if alpha is None else checked_alpha(alpha, where)


def checked_alpha(value, where: str) -> float:
    """A LoRA alpha as a float; raises AdapterError unless it is a positive, finite number."""
    try:
        alpha = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        alpha = math.nan
    if not (math.isfinite(alpha) and 0 < alpha <= 1e6):
        raise AdapterError(f"{where}: lora_alpha is {str(value)[:40]}, not a positive finite number")
    return alpha


DEFAULT_POLICY = ReadPolicy()


def candidate_urls(uri: str, store: Store | None) -> list[str]:
    """The file URLs an adapter URI may mean, in the order they are tried."""

    def weights_in(location: str) -> list[str]:
        if location.endswith(".safetensors"):
            return [location]
        return [f"{location.rstrip('/')}/{name}" for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME)]

    if "://" in uri:
        return weights_in(normalized(uri))
    local = os.path.abspath(os.path.expanduser(uri))
    # A file (or a FIFO or device, refused when read) is itself the adapter; a folder holds it.
    candidates = [local] if os.path.exists(local) and not os.path.isdir(local) else weights_in(local)
    if store is not None and not uri.startswith(("/", "~")):
        try:
            candidates.extend(weights_in(store.uri(uri)))
        except Exception:
            pass  # not a valid store path: the other candidates still apply
    if uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        candidates.append(f"hf://{uri}/{WEIGHTS_NAME}")
    return candidates


def read_adapter(uri: str, store: Store | None, policy: ReadPolicy = DEFAULT_POLICY) -> tuple[AdapterFile, bytes]:
    """Find an adapter's file where the policy allows, read it (bounded), check it is a sound
    safetensors file of finite factors; returns it with its bytes."""
    candidates = [url for url in candidate_urls(uri, store) if policy.allows(url, store)]
    if not candidates:
        raise policy.refusal(uri)
    for url in candidates:
        found = read_adapter_url(url, policy)
        if found is not None:
            return found
    checked = ", ".join(candidates)
    raise AdapterError(f'adapter "{uri}" not found (checked {checked})')


def read_adapter_url(url: str, policy: ReadPolicy = DEFAULT_POLICY) -> tuple[AdapterFile, bytes] | None:
    """The adapter file at one URL (with a PEFT config beside it, if any), or None if it is not there."""
    data = read_bounded(url, policy.max_bytes, policy.timeout_s)
    if data is None:
        return None
    config_bytes = read_bounded(f"{url.rpartition('/')[0]}/{PEFT_CONFIG_NAME}", MAX_CONFIG_BYTES, policy.timeout_s)
    config = parse_peft_config(url, config_bytes) if config_bytes is not None else None
    return parse_safetensors(url, data, config_bytes, config), data


def parse_peft_config(url: str, config_bytes: bytes) -> dict:
    """The PEFT adapter_config.json beside an adapter, as a JSON object."""
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise AdapterError(f"{PEFT_CONFIG_NAME} beside {url} is not a JSON object")
    return config


def content_hash(data, config_bytes: bytes | None) -> str:
    """An adapter's content hash: its file (bytes, or an iterable of chunks), and the PEFT config
    beside it, which can set alpha."""
    digest = hashlib.sha256()
    for chunk in [data] if isinstance(data, bytes) else data:
        digest.update(chunk)  # releases the GIL on large chunks: hashing can run beside other work
    if config_bytes is not None:
        digest.update(b"\0" + PEFT_CONFIG_NAME.encode() + b"\0" + config_bytes)
    return digest.hexdigest()


def file_chunks(path: str, size: int = 16 * 2**20):
    """A local file's bytes, in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
LOCAL_SCHEMES = ("file", "local")  # fsspec's names of the local filesystem


def url_scheme(url: str) -> str | None:
    """A URL's scheme, lowercased as fsspec matches it; None for a plain path."""
    found = SCHEME.match(url)
    return found[1].lower() if found else None


def normalized(url: str) -> str:
    """The URL with its scheme lowercased (`File:///x` → `file:///x`); a plain path as it is."""
    scheme = url_scheme(url)
    return url if scheme is None else f"{scheme}://{url[SCHEME.match(url).end():]}"


def local_path(url: str) -> str | None:
    """The filesystem path of a local file URL (a plain path, file:// or local://, any case), else None."""
    scheme = url_scheme(url)
    if scheme is None:
        return url
    return url[SCHEME.match(url).end() :] if scheme in LOCAL_SCHEMES else None


def read_bounded(url: str, max_bytes: int, timeout_s: float, what: str = "adapter") -> bytes | None:
    """A file's bytes, or None if there is no file at `url` (a folder counts as none). Only a
    regular file is read (never a device or FIFO), only up to `max_bytes`, and a remote read gives
    up after `timeout_s` without an answer; errors name the file as `what` ("adapter", "image")."""
    if "::" in url:
        raise AdapterError(f"{what} {url[:200]}: chained URLs are not read")
    url = normalized(url)
    if url.startswith("hf://"):
        return _read_hub(url, max_bytes, timeout_s)
    path = local_path(url)
    if path is not None:
        return _read_local(path, max_bytes, what)
    try:
        fsspec.get_filesystem_class(url_scheme(url))
    except (ImportError, ValueError) as exc:  # an allowed scheme whose filesystem is not installed (gs: gcsfs)
        raise AdapterError(f"{what} {url[:200]} cannot be read here: {str(exc).splitlines()[0][:200]}") from None
    try:
        fs, fs_path = fsspec.core.url_to_fs(url, **_timeouts(url, timeout_s))
        info = fs.info(fs_path)
        if info.get("type") == "directory":
            return None
        _check_size(url, info.get("size"), max_bytes, what)
        with fs.open(fs_path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, TimeoutError) as exc:
        raise AdapterError(f"{what} {url} could not be read: {type(exc).__name__}: {exc}") from exc
    _check_size(url, len(data), max_bytes, what)
    return data


def check_regular_file(path: str, max_bytes: int) -> None:
    """Raise AdapterError unless `path` is a regular file of at most `max_bytes` (symbolic links followed)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise AdapterError(f"adapter {path} is not a regular file (a device, FIFO or socket): not read")
    _check_size(path, info.st_size, max_bytes)


def open_regular_file(path: str):
    """A local file opened for reading, or None if it is not a regular file (symbolic links
    followed), found without blocking: opening a FIFO waits for a writer, a device reads forever.
    Raises what `open` raises (FileNotFoundError, IsADirectoryError, ...)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fdopen(fd, "rb")
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    return None


def _read_local(path: str, max_bytes: int, what: str = "adapter") -> bytes | None:
    try:
        f = open_regular_file(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise AdapterError(f"{what} {path} could not be read: {exc.strerror}") from None
    if f is None:
        raise AdapterError(f"{what} {path} is not a regular file (a device, FIFO or socket): not read")
    with f:
        _check_size(path, os.fstat(f.fileno()).st_size, max_bytes, what)
        data = f.read(max_bytes + 1)
    _check_size(path, len(data), max_bytes, what)
    return data


def _check_size(url: str, size, max_bytes: int, what: str = "adapter") -> None:
    if size is None or size > max_bytes:
        told = "of unknown size" if size is None else f"larger than {max_bytes // 2**20} MiB"
        setting = " (LORAFLEET_MAX_ADAPTER_MB)" if what == "adapter" else ""
        raise AdapterError(f"{what} {url} is {told}{setting}: not read")


def _timeouts(url: str, timeout_s: float) -> dict:
    """fsspec storage options that bound a remote read's connect and read time."""
    scheme = urlsplit(url).scheme
    if scheme in ("s3", "s3a"):
        return {
            "config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 2}}
        }
    if scheme in ("gs", "gcs"):
        return {"timeout": timeout_s}
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout_s)}}
    return {}


_hub_checked: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout_s: float) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout_s` (asked once a
    minute at most): offline, the hub client retries for over 20 s before it gives up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # the client answers from its local cache at once
    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    checked_at, reachable = _hub_checked.get(host, (0.0, False))
    if time.monotonic() - checked_at > 60:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            reachable = True
        except OSError:
            reachable = False
        _hub_checked[host] = (time.monotonic(), reachable)
    return reachable


def _read_hub(url: str, max_bytes: int, timeout_s: float) -> bytes | None:
    repo, _, filename = url[len("hf://") :].rpartition("/")
    if not hub_reachable(min(timeout_s, 5.0)):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, filename, etag_timeout=timeout_s)
    except Exception:
        return None
    return _read_local(path, max_bytes)


def parse_safetensors(
    url: str, data: bytes, config_bytes: bytes | None = None, config: dict | None = None
) -> AdapterFile:
    """Check that bytes are a whole, sound safetensors file of finite values, and return its
    header, without torch; raises AdapterError saying what is wrong."""
    header, metadata, payload = parse_header(url, data)
    adapter = AdapterFile(url, content_hash(data, config_bytes), header, metadata, config)
    adapter.metadata_alpha(), adapter.config_alpha()  # each raises if its alpha is not a positive number
    for name, info in header.items():
        begin, end = info["data_offsets"]
        check_finite_values(url, name, info["dtype"], payload[begin:end])
    return adapter


def parse_header(url: str, data: bytes) -> tuple[dict, dict, memoryview]:
    """The tensors and metadata a safetensors file's header declares, checked as strictly as the
    safetensors library does (each tensor's dtype, shape and offsets agree, and the tensors fill
    the data exactly), and the data bytes after the header."""

    def bad(why: str) -> AdapterError:
        return AdapterError(f"adapter {url} is not a safetensors file: {why}")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES):
        raise AdapterError(f"adapter {url} is not a safetensors file (or is truncated): bad header length")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError):  # RecursionError: a header nested thousands deep
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map names to strings")
    if not header:
        raise AdapterError(f"adapter {url} holds no tensors")
    payload = memoryview(data)[8 + header_len :]
    regions = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f'tensor "{name[:100]}" must have exactly dtype, shape and data_offsets')
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise bad(f'tensor "{name[:100]}" has an unknown dtype {json.dumps(dtype)[:40]}')
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
            raise bad(f'tensor "{name[:100]}" has a shape that is not a list of sizes')
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
            raise bad(f'tensor "{name[:100]}" has data_offsets that are not [begin, end]')
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f'tensor "{name[:100]}": data_offsets {offsets} disagree with shape {shape} of {dtype}')
        regions.append(offsets)
    end = 0
    for begin, region_end in sorted(regions):
        if begin != end:
            raise bad("tensors overlap or leave gaps in the data")
        end = region_end
    if end != len(payload):
        if end > len(payload):
            raise AdapterError(f"adapter {url} is truncated: {len(payload)} of {end} data bytes present")
        raise bad(f"{len(payload) - end} bytes after the last tensor")
    return header, metadata, payload


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_finite_values(url: str, name: str, dtype: str, raw) -> None:
    """Refuse a float tensor holding NaN, an infinity, or a magnitude beyond MAX_ABS_FACTOR."""
    chunk = 2**24  # elements a step: bounded memory for large adapters
    size = DTYPE_BYTES[dtype]
    for start in range(0, len(raw), chunk * size):
        values = _as_float32(dtype, raw[start : start + chunk * size])
        if values is None:
            return  # integers and booleans are finite
        if not np.isfinite(values).all():
            raise AdapterError(f'adapter {url}: tensor "{name[:100]}" holds NaN or infinite values')
        largest = float(np.abs(values).max(initial=0.0))
        if largest > MAX_ABS_FACTOR:
            raise AdapterError(
                f'adapter {url}: tensor "{name[:100]}" holds {largest:.3g}, beyond ±{MAX_ABS_FACTOR:g} (no LoRA factor is this large)'
            )


def _as_float32(dtype: str, raw) -> np.ndarray | None:
    if dtype in ("F32", "F64", "F16"):
        return np.frombuffer(raw, dtype={"F32": "<f4", "F64": "<f8", "F16": "<f2"}[dtype])
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":  # no infinities; NaN is S.1111.111
        bits = np.frombuffer(raw, dtype=np.uint8)
        return np.where((bits & 0x7F) == 0x7F, np.nan, 0.0).astype(np.float32)
    if dtype == "F8_E5M2":  # the top half of a float16
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.uint16) << 8).view(np.float16)
    return None
