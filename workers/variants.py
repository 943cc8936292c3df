"""Adapter variants of the warm transformer: exact fused weights, built in place.

A fused variant is  W = W0 + lora_scale · Σ_i w_i · (alpha_i / r_i) · B_i A_i  for every module an
adapter touches, computed in fp32 from a pristine copy W0 and rounded once. Because every variant
is built from W0, never from the previous variant, returning to the base or to any variant gives
the same weights bit for bit however many switches came before (diffusers' fuse/unfuse adds and
subtracts in the weights' dtype and drifts).
"""

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import fsspec
import safetensors.torch
import torch

from common.adapters import parse_safetensors
from common.errors import AdapterError

log = logging.getLogger("lorafleet.variants")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class Adapter:
    """One adapter's low-rank matrices by module name, kept on the CPU in fp32."""

    sha256: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A: r×in, B: out×r)
    rank: int
    metadata_alpha: float | None

    @property
    def nbytes(self) -> int:
        """Host memory the matrices take."""
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in diffusers' format, for diffusers' own (unfused) LoRA loading."""
        out = {}
        for module, (a, b) in self.layers.items():
            out[f"transformer.{module}.lora_A.weight"] = a
            out[f"transformer.{module}.lora_B.weight"] = b
        return out


def parse_adapter(url: str, data: bytes) -> Adapter:
    """An Adapter from the bytes of a diffusers-format LoRA safetensors file."""
    header = parse_safetensors(url, data)
    tensors = safetensors.torch.load(data)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stripped = name.removeprefix("transformer.")
        suffix = next((s for s in LORA_SUFFIXES if stripped.endswith(s)), None)
        if suffix is None:
            raise AdapterError(f'adapter {url}: key "{name}" is not a LoRA A/B weight of the transformer')
        pairs.setdefault(stripped.removesuffix(suffix), {})[suffix] = tensor
    layers, ranks = {}, set()
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise AdapterError(f"adapter {url}: {module} has only one of lora_A and lora_B")
        a, b = pair[LORA_SUFFIXES[0]].float(), pair[LORA_SUFFIXES[1]].float()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {url}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, whose ranks differ"
            )
        layers[module] = (a.contiguous(), b.contiguous())
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise AdapterError(f"adapter {url}: modules have different ranks {sorted(ranks)}")
    return Adapter(header.sha256, layers, ranks.pop(), header.metadata_alpha())


class AdapterCache:
    """Adapters in host memory by content hash, least recently used evicted past a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, url: str, sha256: str) -> Adapter:
        """The adapter with this content hash, read from `url` if it is not cached."""
        if sha256 in self._adapters:
            self.hits += 1
            self._adapters.move_to_end(sha256)
            return self._adapters[sha256]
        self.misses += 1
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise AdapterError(f"adapter {url} cannot be read on this worker: {exc}") from exc
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise AdapterError(
                f"adapter {url} changed since it was submitted (sha256 {found[:12]}, job wants {sha256[:12]})"
            )
        adapter = parse_adapter(url, data)
        self._adapters[sha256] = adapter
        while len(self._adapters) > 1 and sum(a.nbytes for a in self._adapters.values()) > self.budget_bytes:
            self._adapters.popitem(last=False)
        return adapter


# One adapter of a combination, with its coefficient w · alpha / r folded in.
Term = tuple[Adapter, float]


class VariantEngine:
    """Switches the transformer between its base weights and fused adapter variants, exactly."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.pristine: dict[str, torch.Tensor] = {}  # module -> W0, captured before its first change
        self.current: tuple = ()  # the variant the weights hold now; () is the base
        self.switches = 0

    def apply(self, terms: list[Term], lora_scale: float, variant: tuple) -> bool:
        """Make the weights hold `variant`; returns False when they already did."""
        if lora_scale == 0 or not terms:
            variant, terms = (), []
        if variant == self.current:
            return False
        plan = self._plan(terms)
        touched = set(self.pristine)  # every module that may differ from W0 now
        with torch.no_grad():
            for name in touched - plan.keys():
                self._weight(name).copy_(self.pristine[name])
            for name, products in plan.items():
                weight = self._weight(name)
                if name not in self.pristine:
                    self.pristine[name] = weight.detach().clone()
                # A copy even when W0 is fp32 already: W0 itself must never change.
                fused = self.pristine[name].to(torch.float32, copy=True)
                for a, b, coefficient in products:
                    fused.addmm_(b.to(fused.device), a.to(fused.device), alpha=lora_scale * coefficient)
                weight.copy_(fused)  # rounds once to the weight's dtype
        self.current = variant
        self.switches += 1
        return True

    def _weight(self, name: str) -> torch.Tensor:
        return self.transformer.get_submodule(name).weight

    def _plan(self, terms: list[Term]) -> dict[str, list]:
        """Each module's (A, B, coefficient) products, checked against the model before any write."""
        plan: dict[str, list] = {}
        for adapter, coefficient in terms:
            missing = []
            for name, (a, b) in adapter.layers.items():
                try:
                    module = self.transformer.get_submodule(name)
                except AttributeError:
                    missing.append(name)
                    continue
                if not isinstance(module, torch.nn.Linear):
                    raise AdapterError(
                        f"adapter {adapter.sha256[:12]}: {name} is a {type(module).__name__}, not a linear layer"
                    )
                expected = (module.out_features, module.in_features)
                if (b.shape[0], a.shape[1]) != expected:
                    raise AdapterError(
                        f"adapter {adapter.sha256[:12]}: {name} is {expected[0]}×{expected[1]} in the model "
                        f"but {b.shape[0]}×{a.shape[1]} in the adapter"
                    )
                plan.setdefault(name, []).append((a, b, coefficient))
            if missing:
                raise AdapterError(
                    f"adapter {adapter.sha256[:12]}: {len(missing)} module(s) match nothing in the model, "
                    f"e.g. {', '.join(missing[:3])}"
                )
        return plan
