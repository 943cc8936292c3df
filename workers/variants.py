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

import logging
from collections.abc import Mapping

import torch

from workers import fp8
from workers.adapter_cache import Adapter
from workers.lru import LRU

log = logging.getLogger("lorafleet.variants")
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

    @property
    def pristine_bytes(self) -> int:
        """Bytes of the pristine copy of the targeted weights."""
        return sum(stack.nbytes for stack in self.groups.values())
