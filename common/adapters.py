"""Adapter files: from the URI a user wrote to a safetensors file (read through common/reading.py),
its content hash, and a header checked as strictly as the safetensors library does.

No torch here: the producer checks adapters by reading the safetensors header, and the worker
turns the same bytes into tensors (workers/variants.py).
"""

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from common import reading
from common.errors import AdapterError
from common.reading import ReadPolicy, read_bounded

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


def weights_in(location: str) -> list[str]:
    """The files an adapter location stands for: a .safetensors file itself, else the weights file
    in the folder (diffusers' name first, then PEFT's)."""
    if location.endswith(".safetensors"):
        return [location]
    return [f"{location.rstrip('/')}/{name}" for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME)]


def hub_urls(uri: str) -> list[str]:
    """The hub file a bare `owner/name` URI may mean, tried after every local and store path."""
    if "://" not in uri and uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        return [f"hf://{uri}/{WEIGHTS_NAME}"]
    return []


def candidate_urls(uri: str, store: str | None) -> list[str]:
    """The file URLs an adapter URI may mean, in the order they are tried: the weights file in a
    folder (local, the store's, or a URL), a .safetensors file itself, then a hub repo id."""
    return reading.candidate_urls(uri, store, weights_in) + hub_urls(uri)


def read_adapter(uri: str, policy: ReadPolicy) -> tuple[AdapterFile, bytes]:
    """Find an adapter's file where the policy allows, read it (bounded), check it is a sound
    safetensors file of finite factors; returns it with its bytes."""
    url, data = reading.read_first(uri, policy, "adapter", weights_in, also=hub_urls(uri))
    return parse_adapter(url, data, policy), data


def read_adapter_url(url: str, policy: ReadPolicy) -> tuple[AdapterFile, bytes] | None:
    """The adapter file at one URL (with a PEFT config beside it, if any), or None if it is not there."""
    data = read_bounded(url, policy.max_bytes, policy.timeout_s)
    return None if data is None else (parse_adapter(url, data, policy), data)


def parse_adapter(url: str, data: bytes, policy: ReadPolicy) -> AdapterFile:
    """An adapter file's bytes checked and parsed, with the PEFT config beside it (read bounded) if any."""
    config_bytes = read_bounded(f"{url.rpartition('/')[0]}/{PEFT_CONFIG_NAME}", MAX_CONFIG_BYTES, policy.timeout_s)
    config = parse_peft_config(url, config_bytes) if config_bytes is not None else None
    return parse_safetensors(url, data, config_bytes, config)


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
    """`check_finite_factor` over a tensor's raw safetensors bytes, a bounded chunk at a time."""
    chunk = 2**24  # elements a step: bounded memory for large adapters
    size = DTYPE_BYTES[dtype]
    for start in range(0, len(raw), chunk * size):
        values = _as_float32(dtype, raw[start : start + chunk * size])
        if values is None:
            return  # integers and booleans are finite
        check_finite_factor(url, name, values)


def check_finite_factor(url: str, name: str, values: np.ndarray) -> None:
    """The one rule for a LoRA factor's values (at submit, on the raw bytes; on a worker, on its
    tensors): refused if it holds NaN, an infinity, or a magnitude beyond MAX_ABS_FACTOR."""
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
