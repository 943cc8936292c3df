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
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class AdapterFile:
    """A resolved adapter: where its file is, its content hash and what its header declares."""

    url: str  # an fsspec URL any worker can read (absolute for local files)
    sha256: str
    tensors: dict  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict

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

    def weights_in(location: str) -> str:
        return location if location.endswith(".safetensors") else f"{location.rstrip('/')}/{WEIGHTS_NAME}"

    if "://" in uri:
        return [weights_in(uri)]
    candidates = []
    local = os.path.abspath(os.path.expanduser(uri))
    if os.path.isfile(local):
        candidates.append(local)
    else:
        candidates.append(os.path.join(local, WEIGHTS_NAME))
    if store is not None and not uri.startswith(("/", "~")):
        try:
            candidates.append(weights_in(store.uri(uri)))
        except Exception:
            pass  # not a valid store path: the other candidates still apply
    if uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        candidates.append(f"hf://{uri}/{WEIGHTS_NAME}")
    return candidates


def read_adapter(uri: str, store: Store | None) -> tuple[AdapterFile, bytes]:
    """Find an adapter's file, read it whole, check it is safetensors; returns it with its bytes."""
    candidates = candidate_urls(uri, store)
    for url in candidates:
        data = _read(url)
        if data is not None:
            return parse_safetensors(url, data), data
    checked = ", ".join(candidates)
    raise AdapterError(f'adapter "{uri}" not found (checked {checked})')


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


def parse_safetensors(url: str, data: bytes) -> AdapterFile:
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
    return AdapterFile(url=url, sha256=hashlib.sha256(data).hexdigest(), tensors=header, metadata=metadata)
