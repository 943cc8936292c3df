"""Adapter variants of the warm transformer: exact fused weights, switched in place in milliseconds.

A fused variant is, for every linear layer M an adapter touches,

    W_M = W0_M + lora_scale · Σ_i w_i · (alpha_i / r_i) · B_i A_i

built from a pristine copy W0 as one batched `baddbmm` per group of same-shaped layers: the
adapters' factors are stacked along the rank (coefficients folded into B), the product accumulates
in fp32 inside the matrix unit, and the sum with W0 is rounded once to the weights' dtype. Every variant is built from W0, never from
the previous one, so the base or any variant comes back bit for bit however many switches came
before (diffusers' fuse/unfuse adds and subtracts in the weights' dtype and drifts). Writing the
weights in place leaves no adapter wrappers in the model and never recompiles a compiled one.
In the fp8 tier the pristine copy is the bf16 weights from before quantization, and each fused
variant is quantized per row as torchao quantized the base (workers/fp8.py).

Three caches keep switching cheap, each with a budget and least-recently-used eviction:
adapter files on local disk by content hash (AdapterFiles), parsed adapters in host memory
(AdapterCache), their factors on the device (in VariantEngine); optionally whole fused variants on
the device, so that a hit costs one copy.
"""

import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import safetensors.torch
import torch

from common.adapters import (
    DEFAULT_POLICY,
    MAX_ABS_FACTOR,
    MAX_CONFIG_BYTES,
    PEFT_CONFIG_NAME,
    AdapterFile,
    ReadPolicy,
    check_regular_file,
    checked_alpha,
    content_hash,
    file_chunks,
    local_path,
    parse_peft_config,
    read_adapter_url,
    read_bounded,
)
from common.errors import AdapterError
from common.lora_formats import ALPHA, A, B, check_factors, detect_layout
from workers import fp8

log = logging.getLogger("lorafleet.variants")


class LRU:
    """A least-recently-used map with a byte budget, counting its hits and misses."""

    def __init__(self, budget_bytes: int, size=lambda value: 0):
        self.budget_bytes = budget_bytes
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get(self, key):
        """The cached value, or None (counted as a miss)."""
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        """Cache a value, evicting the least recently used past the budget (never the newest)."""
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > 1 and self.nbytes > self.budget_bytes:
            self.items.popitem(last=False)
            self.evictions += 1

    @property
    def nbytes(self) -> int:
        """Bytes the cached values take."""
        return sum(self.size(value) for value in self.items.values())

    def stats(self) -> dict:
        """Hits, misses, evictions, entries and bytes, for logs and job metadata."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self.items),
            "bytes": self.nbytes,
        }


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
    """Refuse a factor holding NaN, an infinity or a magnitude no LoRA has (as submit does, for
    messages from other clients and files changed since)."""
    if not torch.isfinite(factor).all():
        raise AdapterError(f'adapter {path}: tensor "{name}" holds NaN or infinite values')
    largest = factor.abs().max().item() if factor.numel() else 0.0
    if largest > MAX_ABS_FACTOR:
        raise AdapterError(f'adapter {path}: tensor "{name}" holds {largest:.3g}, beyond ±{MAX_ABS_FACTOR:g}')


class AdapterFiles:
    """Adapter files on this host's disk by content hash: an adapter in S3 is downloaded once per host.

    A local file is used where it is; its hash is checked in a thread while it loads.
    """

    def __init__(self, directory: str, budget_bytes: int, policy: ReadPolicy = DEFAULT_POLICY, store=None):
        self.directory = os.path.expanduser(directory)
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.store = store  # always readable, whatever the policy
        self.hits = self.misses = 0

    def fetch(self, url: str, sha256: str) -> tuple[str, dict | None, Future]:
        """A local path of the adapter, its PEFT config if any, and a future that raises if the
        content is not what the job was submitted with."""
        folder = os.path.join(self.directory, sha256)
        cached = os.path.join(folder, "adapter.safetensors")
        if os.path.exists(cached):
            self.hits += 1
            os.utime(folder)  # recently used: evicted last
            return cached, _read_json(os.path.join(folder, PEFT_CONFIG_NAME)), _done()
        self.misses += 1
        if not self.policy.allows(url, self.store):
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
        _verify(
            url,
            sha256,
            data,
            json.dumps(adapter.config).encode() if adapter.config is not None else None,
            adapter.sha256,
        )
        return self._store(folder, adapter, data), adapter.config, _done()

    def _store(self, folder: str, adapter: AdapterFile, data: bytes) -> str:
        tmp = f"{folder}.tmp-{os.getpid()}"
        try:
            os.makedirs(tmp, exist_ok=True)
            with open(os.path.join(tmp, "adapter.safetensors"), "wb") as f:
                f.write(data)
            if adapter.config is not None:
                with open(os.path.join(tmp, PEFT_CONFIG_NAME), "w") as f:
                    json.dump(adapter.config, f)
            if os.path.exists(folder):
                shutil.rmtree(tmp)  # another worker of this host stored it first
            else:
                os.replace(tmp, folder)
            self._evict()
            return os.path.join(folder, "adapter.safetensors")
        except OSError as exc:  # a full or read-only disk: keep the bytes in a temporary file instead
            log.warning("adapter disk cache: cannot keep %s: %s", adapter.sha256[:12], exc)
            shutil.rmtree(tmp, ignore_errors=True)
            spare = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
            spare.write(data)
            spare.close()
            return spare.name

    def _evict(self) -> None:
        entries = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if os.path.isdir(path) and ".tmp-" not in name:
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                entries.append((os.path.getmtime(path), size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries)[:-1]:
            if total <= self.budget_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= size

    def stats(self) -> dict:
        """Hits and misses since the worker started."""
        return {"hits": self.hits, "misses": self.misses}


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


def _verify(url: str, sha256: str, data, config_bytes: bytes | None, found: str | None = None) -> None:
    found = found or content_hash(data, config_bytes)
    if found != sha256:
        raise AdapterError(
            f"adapter {url} changed since it was submitted (sha256 {found[:12]}, job wants {sha256[:12]})"
        )


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


# One adapter of a combination: the adapter, its weight, and the job's alpha (None: the file's).
Term = tuple[Adapter, float, float | None]


class VariantEngine:
    """Switches the transformer between its base weights and fused adapter variants, exactly.

    The targeted layers are handled in groups of one shape: a group's pristine weights are kept
    as one stacked tensor W0 [n, out, in], each adapter's factors as stacks A [n, r, in] and
    B [n, out, r], so a variant is one `baddbmm` per group (W0 + B·A, fp32 accumulation, one
    rounding) and one fused copy into the layers: a handful of kernel launches for the whole model.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        device_cache_bytes: int,
        variant_cache_size: int = 0,
        pristine_on_host: bool = False,
        device: torch.device | None = None,
        originals: Mapping[str, torch.Tensor] | None = None,
    ):
        self.transformer = transformer
        # Where variants are computed: the weights' device, or the GPU while model offload keeps the
        # weights on the host (the same kernels, so the same bits, wherever the weights live).
        self.device = device or next(transformer.parameters()).device
        self.linears = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        self.pristine_on_host = pristine_on_host
        # The fp8 tier's bf16 weights from before quantization (read from the model's files): its W0.
        self.originals = originals or {}
        self.groups: dict[tuple[str, ...], torch.Tensor] = {}  # layer names of one shape -> their W0, stacked
        self.pristine: dict[str, torch.Tensor] = {}  # layer -> its W0 (a view into a group's stack)
        self.touched: set[str] = set()  # layers whose weights differ from W0 now
        self.current: tuple = ()  # the variant the weights hold now; () is the base
        self.switches = 0
        self.factors = LRU(device_cache_bytes, size=lambda ab: ab[0].nbytes + ab[1].nbytes)
        self.variants = LRU(variant_cache_size, size=lambda _: 1) if variant_cache_size else None

    def apply(self, terms: list[Term], lora_scale: float, variant: tuple) -> bool:
        """Make the weights hold `variant`; returns False when they already did."""
        if lora_scale == 0 or not terms:
            variant, terms = (), []
        if variant == self.current:
            return False
        fused = self.variants.get(variant) if self.variants is not None and variant else None
        built = fused is None
        with torch.no_grad():
            if built:
                fused = [
                    (names, self._encode(names, torch.baddbmm(w0, b, a)))
                    for names, w0, b, a in self._plan(terms, lora_scale)
                ]
            targets = {name for names, _ in fused for name in names}
            self._restore(sorted(self.touched - targets))
            for names, value in fused:
                self._write(names, value)
        if built and self.variants is not None and variant:
            self.variants.put(variant, fused)
        self.touched = targets
        self.current = variant
        self.switches += 1
        return True

    def _encode(self, names: tuple[str, ...], stack: torch.Tensor):
        """A group's fused weights as its layers store them: as they are, or quantized (fp8 tier)."""
        like = self.linears[names[0]].weight
        return fp8.encode(stack, like) if fp8.is_fp8(like) else stack

    def _write(self, names: tuple[str, ...], value) -> None:
        """Copy a group's encoded weights into its layers, in place."""
        weights = [self.linears[n].weight for n in names]
        if fp8.is_fp8(weights[0]):
            fp8.write(weights, value)
        else:
            torch._foreach_copy_(weights, list(value.unbind(0)))

    def _restore(self, names: list[str]) -> None:
        """Put these layers back at W0: a copy, or (fp8) W0 quantized again, as torchao quantized it."""
        plain = [n for n in names if not fp8.is_fp8(self.linears[n].weight)]
        if plain:
            torch._foreach_copy_([self.linears[n].weight for n in plain], [self.pristine[n] for n in plain])
        shapes: dict[tuple, list[str]] = {}
        for name in names:
            if fp8.is_fp8(self.linears[name].weight):
                shapes.setdefault(tuple(self.linears[name].weight.shape), []).append(name)
        for group in shapes.values():
            w0 = torch.stack([self.pristine[n] for n in group]).to(self.device, non_blocking=True)
            self._write(tuple(group), self._encode(tuple(group), w0))

    def _plan(self, terms: list[Term], lora_scale: float) -> list[tuple]:
        """Per group of same-shaped layers: (names, W0, B [n, out, Σr], A [n, Σr, in]). The adapters
        were checked against the model when they were loaded (AdapterCache)."""
        groups: dict[tuple, set[str]] = {}
        for adapter, _, _ in terms:
            for name in adapter.layers:
                weight = self.linears[name].weight
                groups.setdefault((tuple(weight.shape), weight.dtype), set()).add(name)
        plan = []
        for members in groups.values():
            names = tuple(sorted(members))
            w0 = self._pristine_stack(names)
            a_parts, b_parts = [], []
            for adapter, weight, job_alpha in terms:
                if not any(name in adapter.layers for name in names):
                    continue
                a, b = self._device_factors(adapter, names)
                coefficients = [
                    lora_scale * adapter.coefficient(name, weight, job_alpha) if name in adapter.layers else 0.0
                    for name in names
                ]
                scale = torch.tensor(coefficients, dtype=torch.float32).to(b.device, non_blocking=True)
                a_parts.append(a)
                b_parts.append((b.float() * scale.view(-1, 1, 1)).to(b.dtype))  # w·alpha/r folded into B
            a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)
            b = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=2)
            plan.append((names, w0.to(a.device, non_blocking=True), b, a))
        return plan

    def _pristine_stack(self, names: tuple[str, ...]) -> torch.Tensor:
        """The stacked W0 of these layers, captured the first time they are used together."""
        if names not in self.groups:
            weights = [self._w0(name) for name in names]
            stack = torch.stack([w.detach() for w in weights]).to(self.linears[names[0]].weight.device)
            if self.pristine_on_host and self.device.type == "cuda":
                stack = stack.cpu().pin_memory()
            self.groups[names] = stack
            for i, name in enumerate(names):
                self.pristine.setdefault(name, stack[i])
        return self.groups[names]

    def _w0(self, name: str) -> torch.Tensor:
        """A layer's pristine weights: captured before, or (fp8) read from the model's files, or
        its weights now (an untouched layer is at W0)."""
        if name in self.pristine:
            return self.pristine[name]
        if name in self.originals:
            return self.originals[name]
        return self.linears[name].weight

    def _device_factors(self, adapter: Adapter, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """An adapter's factors for a group, stacked on the device in the weights' dtype: A [n, r, in]
        and B [n, out, r], zero for layers it does not touch; cached by content hash and group."""
        key = (adapter.sha256, names)
        found = self.factors.get(key)
        if found is None:
            weight = self.linears[names[0]].weight
            (out_features, in_features), rank = weight.shape, max(a.shape[0] for a, _, _ in adapter.layers.values())
            a_stack = torch.zeros(len(names), rank, in_features, dtype=weight.dtype, device=self.device)
            b_stack = torch.zeros(len(names), out_features, rank, dtype=weight.dtype, device=self.device)
            for i, name in enumerate(names):  # straight into place on the device: no stacking on the host
                if name in adapter.layers:
                    a, b, _ = adapter.layers[name]
                    a_stack[i, : a.shape[0]].copy_(a)
                    b_stack[i, :, : b.shape[1]].copy_(b)
            found = (a_stack, b_stack)
            self.factors.put(key, found)
        return found

    def layer_sizes(self) -> dict[str, tuple[int, int]]:
        """The model's linear layers, name -> (out_features, in_features): what adapters may target."""
        return {name: (m.out_features, m.in_features) for name, m in self.linears.items()}

    def stats(self) -> dict:
        """Switches and the device caches' counts and bytes, for logs and job metadata."""
        out = {"switches": self.switches, "device_factors": self.factors.stats()}
        if self.variants is not None:
            out["fused_variants"] = self.variants.stats()
        out["pristine_bytes"] = sum(stack.nbytes for stack in self.groups.values())
        return out
