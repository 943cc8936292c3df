"""Adapters on a worker, by content hash: their files on this host's disk (an adapter in S3 is
downloaded once per host), and parsed into factors in host memory, checked against the model.
The variant engine (workers/variants.py) takes their factors from here."""

import contextlib
import json
import logging
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import safetensors.torch
import torch

from common.adapters import (
    MAX_CONFIG_BYTES,
    PEFT_CONFIG_NAME,
    AdapterFile,
    check_finite_factor,
    checked_alpha,
    content_hash,
    parse_peft_config,
    read_adapter_url,
)
from common.errors import AdapterError
from common.lora_formats import ALPHA, A, B, check_factors, detect_layout
from common.reading import ReadPolicy, check_regular_file, check_unchanged, file_chunks, local_path, read_bounded
from common.store import write_atomically
from workers.lru import LRU, CacheCounts

log = logging.getLogger("lorafleet.variants")


@dataclass
class Adapter:
    """One adapter's factors by module, on the CPU as stored, with each module's alpha if the file gives one."""

    sha256: str
    format: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]  # module -> (A: r×in, B: out×r, alpha)

    @property
    def nbytes(self) -> int:
        """Host memory the factors take."""
        return sum(a.nbytes + b.nbytes for a, b, _ in self.layers.values())

    def coefficient(self, module: str, weight: float, job_alpha: float | None) -> float:
        """w · alpha / r for one module; alpha from the job, else the file, else the rank."""
        a, _, file_alpha = self.layers[module]
        rank = a.shape[0]
        return weight * (job_alpha or file_alpha or rank) / rank

    def state_dict(self, weight: float, job_alpha: float | None) -> dict[str, torch.Tensor]:
        """The adapter in diffusers' format with each module's w·alpha/r folded into B, for
        diffusers' own (unfused) LoRA layers, which assume alpha = rank and weight 1."""
        out = {}
        for module, (a, b, _) in self.layers.items():
            out[f"transformer.{module}.lora_A.weight"] = a
            out[f"transformer.{module}.lora_B.weight"] = b * self.coefficient(module, weight, job_alpha)
        return out


def load_adapter(path: str, sha256: str, config: dict | None, module_names) -> Adapter:
    """An Adapter from a local safetensors file in any supported format, read through mmap.

    Alpha, per module: the kohya `.alpha` tensor, else the file's metadata, else a PEFT config
    beside the file, else none (the rank); a job's alpha overrides all of them.
    """
    with safetensors.safe_open(path, framework="pt") as f:
        header = AdapterFile(path, sha256, {k: {} for k in f.keys()}, f.metadata() or {}, config)
        try:
            layout = detect_layout(list(header.tensors), module_names)
        except AdapterError as exc:
            raise AdapterError(f"adapter {path}: {exc}") from None
        file_alpha = header.metadata_alpha() or header.config_alpha()
        layers = {}
        for module, roles in layout.modules.items():
            a, b = f.get_tensor(roles[A]), f.get_tensor(roles[B])  # shapes: checked against the model on use
            for role, factor in ((A, a), (B, b)):
                check_factor(path, roles[role], factor)
            alpha = file_alpha
            if ALPHA in roles:
                value = f.get_tensor(roles[ALPHA])
                if value.numel() != 1:
                    raise AdapterError(f"adapter {path}: {roles[ALPHA]} must hold one number, not {tuple(value.shape)}")
                alpha = checked_alpha(value.float().item(), f"adapter {path}: {roles[ALPHA]}")
            layers[module] = (a.contiguous(), b.contiguous(), alpha)
    return Adapter(sha256, layout.format, layers)


def check_factor(path: str, name: str, factor: torch.Tensor) -> None:
    """Refuse a factor as submit does (common/adapters.py: `check_finite_factor`), for messages from
    other clients and files changed since."""
    check_finite_factor(path, name, factor.float().numpy())


class AdapterFiles:
    """Adapter files on this host's disk by content hash: an adapter in S3 is downloaded once per host.

    A local file is used where it is; its hash is checked in a thread while it loads.
    """

    def __init__(self, directory: str, budget_bytes: int, policy: ReadPolicy):
        self.directory = os.path.expanduser(directory)
        self.budget_bytes = budget_bytes
        self.policy = policy  # its store always readable
        self.hits = self.misses = 0

    def fetch(self, url: str, sha256: str) -> tuple[str, dict | None, Future]:
        """A local path of the adapter, its PEFT config if any, and a future that raises if the
        content is not what the job was submitted with."""
        cached, config = self._paths(sha256)
        if os.path.exists(cached):
            self.hits += 1
            os.utime(cached)  # recently used: evicted last
            return cached, _read_json(config), _done()
        self.misses += 1
        if not self.policy.allows(url):
            raise self.policy.refusal(url)
        path = local_path(url)
        if path is not None and os.path.isfile(path):  # read in place, through mmap: bounded like any read
            check_regular_file(path, self.policy.max_bytes)
            config_path = os.path.join(os.path.dirname(path), PEFT_CONFIG_NAME)
            config_bytes = read_bounded(config_path, MAX_CONFIG_BYTES, self.policy.timeout_s)
            verified = _HASHING.submit(_verify, url, sha256, file_chunks(path), config_bytes)
            return path, parse_peft_config(url, config_bytes) if config_bytes else None, verified
        found = read_adapter_url(url, self.policy)
        if found is None:
            raise AdapterError(f"adapter {url} is not readable from this worker")
        adapter, data = found
        check_unchanged("adapter", url, adapter.sha256, sha256)
        return self._keep(adapter, data), adapter.config, _done()

    def _paths(self, sha256: str) -> tuple[str, str]:
        """Where an adapter's file and its PEFT config are kept: `<sha256>.safetensors`, `<sha256>.json`."""
        return os.path.join(self.directory, f"{sha256}.safetensors"), os.path.join(self.directory, f"{sha256}.json")

    def _keep(self, adapter: AdapterFile, data: bytes) -> str:
        """Keep a downloaded adapter on disk (its config first: the safetensors file marks it whole)."""
        path, config = self._paths(adapter.sha256)
        try:
            if adapter.config is not None:
                write_atomically(config, json.dumps(adapter.config).encode())
            write_atomically(path, data)
            self._evict()
            return path
        except OSError as exc:  # a full or read-only disk: keep the bytes in a temporary file instead
            log.warning("adapter disk cache: cannot keep %s: %s", adapter.sha256[:12], exc)
            spare = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
            spare.write(data)
            spare.close()
            return spare.name

    def _evict(self) -> None:
        """Remove the least recently used adapters past the budget (never the newest)."""
        kept = []
        for name in os.listdir(self.directory):
            if name.endswith(".safetensors") and ".tmp-" not in name:
                path = os.path.join(self.directory, name)
                kept.append((os.path.getmtime(path), os.path.getsize(path), path))
        total = sum(size for _, size, _ in kept)
        for _, size, path in sorted(kept)[:-1]:
            if total <= self.budget_bytes:
                break
            for gone in (path, path.removesuffix(".safetensors") + ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(gone)
            total -= size

    def stats(self) -> CacheCounts:
        """Hits and misses since the worker started."""
        return CacheCounts(self.hits, self.misses)


_HASHING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-hash")


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _verify(url: str, sha256: str, data, config_bytes: bytes | None) -> None:
    check_unchanged("adapter", url, content_hash(data, config_bytes), sha256)


class AdapterCache:
    """Parsed adapters in host memory by content hash, over the disk cache."""

    def __init__(self, files: AdapterFiles, budget_bytes: int, layer_sizes: dict[str, tuple[int, int]]):
        self.files = files
        self.layer_sizes = layer_sizes  # the model's linear layers: name -> (out_features, in_features)
        self.lru = LRU(budget_bytes, size=lambda adapter: adapter.nbytes)

    def get(self, url: str, sha256: str) -> Adapter:
        """The adapter with this content hash, read (from disk or `url`) and checked against the
        model if it is not cached."""
        adapter = self.lru.get(sha256)
        if adapter is None:
            path, config, verified = self.files.fetch(url, sha256)
            adapter = load_adapter(path, sha256, config, self.layer_sizes)
            try:
                check_factors({m: (a.shape, b.shape) for m, (a, b, _) in adapter.layers.items()}, self.layer_sizes)
            except AdapterError as exc:
                raise AdapterError(f"adapter {path}: {exc}") from None
            verified.result()  # the hash, computed while the tensors loaded
            self.lru.put(sha256, adapter)
        return adapter
