"""Adapter resolution: from the URI a user wrote to a safetensors file, its bytes and content hash.

No torch here: the producer checks adapters by reading the safetensors header, and the worker
turns the same bytes into tensors (workers/variants.py).
"""

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import fsspec

from common.errors import AdapterError
from common.store import Store

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class AdapterFile:
    """A resolved adapter: where its file is, its content hash and what its header declares."""

    url: str  # an fsspec URL any worker can read (absolute for local files)
    sha256: str  # of the file, and of the PEFT config beside it if there is one
    tensors: dict  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict
    config: dict | None = None  # a PEFT adapter_config.json found beside the file

    def config_alpha(self) -> float | None:
        """The lora_alpha of a PEFT config beside the file, if any."""
        alpha = (self.config or {}).get("lora_alpha")
        return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None

    def shapes(self) -> dict[str, list[int]]:
        """Each tensor's shape, by name."""
        return {name: info["shape"] for name, info in self.tensors.items()}

    def metadata_alpha(self) -> float | None:
        """The LoRA alpha the file's metadata declares (diffusers writes it), if any."""
        raw = self.metadata.get("lora_adapter_metadata")
        if raw:
            try:
                alpha = json.loads(raw).get("transformer.lora_alpha")
            except (ValueError, AttributeError):
                alpha = None
            if isinstance(alpha, (int, float)):
                return float(alpha)
        alpha = self.metadata.get("lora_alpha") or self.metadata.get("alpha")
        try:
            return float(alpha) if alpha is not None else None
        except ValueError:
            return None


def candidate_urls(uri: str, store: Store | None) -> list[str]:
    """The file URLs an adapter URI may mean, in the order they are tried."""

    def weights_in(location: str) -> list[str]:
        if location.endswith(".safetensors"):
            return [location]
        return [f"{location.rstrip('/')}/{name}" for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME)]

    if "://" in uri:
        return weights_in(uri)
    local = os.path.abspath(os.path.expanduser(uri))
    candidates = [local] if os.path.isfile(local) else weights_in(local)
    if store is not None and not uri.startswith(("/", "~")):
        try:
            candidates.extend(weights_in(store.uri(uri)))
        except Exception:
            pass  # not a valid store path: the other candidates still apply
    if uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        candidates.append(f"hf://{uri}/{WEIGHTS_NAME}")
    return candidates


def read_adapter(uri: str, store: Store | None) -> tuple[AdapterFile, bytes]:
    """Find an adapter's file, read it whole, check it is safetensors; returns it with its bytes."""
    candidates = candidate_urls(uri, store)
    for url in candidates:
        found = read_adapter_url(url)
        if found is not None:
            return found
    checked = ", ".join(candidates)
    raise AdapterError(f'adapter "{uri}" not found (checked {checked})')


def read_adapter_url(url: str) -> tuple[AdapterFile, bytes] | None:
    """The adapter file at one URL (with a PEFT config beside it, if any), or None if it is not there."""
    data = _read(url)
    if data is None:
        return None
    config_bytes = _read(f"{url.rpartition('/')[0]}/{PEFT_CONFIG_NAME}")
    config = None
    if config_bytes is not None:
        try:
            config = json.loads(config_bytes)
        except ValueError:
            raise AdapterError(f"{PEFT_CONFIG_NAME} beside {url} is not JSON") from None
    return parse_safetensors(url, data, config_bytes, config), data


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


def local_path(url: str) -> str | None:
    """The filesystem path of a local file URL (a plain path or file://), else None."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url if "://" not in url else None


def _read(url: str) -> bytes | None:
    if url.startswith("hf://"):
        repo, _, filename = url[len("hf://") :].rpartition("/")
        try:
            from huggingface_hub import hf_hub_download

            return open(hf_hub_download(repo, filename), "rb").read()
        except Exception:
            return None
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as exc:
        raise AdapterError(f"adapter {url} could not be read: {exc}") from exc


def parse_safetensors(
    url: str, data: bytes, config_bytes: bytes | None = None, config: dict | None = None
) -> AdapterFile:
    """Check that bytes are a whole safetensors file and return its header, without torch."""
    if len(data) < 8:
        raise AdapterError(f"adapter {url} is not a safetensors file (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES):
        raise AdapterError(f"adapter {url} is not a safetensors file (or is truncated): bad header length")
    try:
        header = json.loads(data[8 : 8 + header_len])
        assert isinstance(header, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise AdapterError(f"adapter {url} is not a safetensors file: its header is not JSON") from None
    metadata = header.pop("__metadata__", None) or {}
    ends = [info.get("data_offsets", [0, 0])[1] for info in header.values() if isinstance(info, dict)]
    payload = len(data) - 8 - header_len
    if not header:
        raise AdapterError(f"adapter {url} holds no tensors")
    if max(ends) > payload:
        raise AdapterError(f"adapter {url} is truncated: {payload} of {max(ends)} data bytes present")
    return AdapterFile(url, content_hash(data, config_bytes), header, metadata, config)
