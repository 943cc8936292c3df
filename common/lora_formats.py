"""The LoRA file formats users bring, mapped onto the model's module names, without torch.

Both sides use this one mapping: the producer, on a safetensors header (names and shapes), to
check an adapter against the model's config at submit time; the worker, on the tensors.

| format | keys (per targeted linear layer M) | alpha |
| --- | --- | --- |
| diffusers | `transformer.M.lora_A.weight`, `transformer.M.lora_B.weight` | metadata `lora_adapter_metadata` |
| PEFT | `base_model.model.M.lora_A[.default].weight`, `…lora_B…` | `adapter_config.json` beside |
| kohya | `lora_unet_M_with_underscores.lora_down.weight`, `.lora_up.weight`, `.alpha` | the `.alpha` tensors |
| SAT (CogVideo) | `…layers.{i}.attention.query_key_value.matrix_A.{0,1,2}` (q, k, v), `…attention.dense.matrix_A.0` | none |
"""

import re
from dataclasses import dataclass

from common.errors import AdapterError

A, B, ALPHA = "A", "B", "alpha"
_SAT_TARGETS = {
    "query_key_value.matrix_A.0": ("attn1.to_q", A),
    "query_key_value.matrix_A.1": ("attn1.to_k", A),
    "query_key_value.matrix_A.2": ("attn1.to_v", A),
    "query_key_value.matrix_B.0": ("attn1.to_q", B),
    "query_key_value.matrix_B.1": ("attn1.to_k", B),
    "query_key_value.matrix_B.2": ("attn1.to_v", B),
    "dense.matrix_A.0": ("attn1.to_out.0", A),
    "dense.matrix_B.0": ("attn1.to_out.0", B),
}
_SAT_KEY = re.compile(r"^(?:model\.diffusion_model\.)?(?:transformer\.)?layers\.(\d+)\.attention\.(.+)$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_DIFFUSERS_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^lora_(?:unet|transformer|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_ROLES = {"lora_down.weight": A, "lora_up.weight": B, "alpha": ALPHA}


@dataclass(frozen=True)
class Layout:
    """Where each targeted module's A, B (and alpha) live in a file: module -> {role: key}."""

    format: str
    modules: dict[str, dict[str, str]]


def detect_layout(keys: list[str], module_names) -> Layout:
    """Map a file's tensor names onto module names; raises AdapterError for keys it cannot place.

    `module_names` (the model's linear layers) is needed to undo kohya's underscores.
    """
    if not keys:
        raise AdapterError("holds no tensors")
    if any(_KOHYA_KEY.match(k) for k in keys):
        fmt = "kohya"
        underscored = {name.replace(".", "_"): name for name in module_names}
    elif any(_SAT_KEY.match(k) for k in keys):
        fmt = "sat"
    elif any(k.startswith("base_model.model.") for k in keys):
        fmt = "peft"
    else:
        fmt = "diffusers"
    modules: dict[str, dict[str, str]] = {}
    unplaced = []
    for key in keys:
        placed = None
        if fmt == "kohya":
            match = _KOHYA_KEY.match(key)
            if match and match.group(1) in underscored:
                placed = underscored[match.group(1)], _KOHYA_ROLES[match.group(2)]
        elif fmt == "sat":
            match = _SAT_KEY.match(key)
            if match and match.group(2) in _SAT_TARGETS:
                target, role = _SAT_TARGETS[match.group(2)]
                placed = f"transformer_blocks.{match.group(1)}.{target}", role
        else:
            match = (_PEFT_KEY if fmt == "peft" else _DIFFUSERS_KEY).match(key)
            if match:
                placed = match.group(1), match.group(2)
        if placed is None:
            unplaced.append(key)
            continue
        module, role = placed
        if role in modules.setdefault(module, {}):
            raise AdapterError(f"has two {role} tensors for {module}")
        modules[module][role] = key
    if unplaced:
        raise AdapterError(
            f"{len(unplaced)} key(s) of a {fmt}-format LoRA match no module, e.g. {', '.join(unplaced[:3])}"
        )
    for module, roles in modules.items():
        if A not in roles or B not in roles:
            raise AdapterError(f"{module} has only lora_{'A' if A in roles else 'B'}, not both")
    return Layout(fmt, modules)


def check_shapes(layout: Layout, shapes: dict[str, list[int]], linear_layers: dict[str, tuple[int, int]]) -> None:
    """Check a file's layout against the model from its tensors' shapes (a header is enough)."""
    check_factors({m: (shapes[roles[A]], shapes[roles[B]]) for m, roles in layout.modules.items()}, linear_layers)


def check_factors(factors: dict[str, tuple], linear_layers: dict[str, tuple[int, int]]) -> None:
    """Check every targeted module exists in the model and its A (r×in) and B (out×r) shapes fit
    it; raises AdapterError. The one shape check, at submit (headers) and on the worker (tensors)."""
    missing = [m for m in factors if m not in linear_layers]
    if missing:
        raise AdapterError(
            f"{len(missing)} module(s) match no linear layer of the model, e.g. {', '.join(missing[:3])}"
        )
    for module, (a, b) in factors.items():
        a, b = list(a), list(b)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterError(f"{module}: lora_A {tuple(a)} and lora_B {tuple(b)} have different ranks")
        out_features, in_features = linear_layers[module]
        if (b[0], a[1]) != (out_features, in_features):
            raise AdapterError(
                f"{module} is {out_features}×{in_features} in the model but {b[0]}×{a[1]} in the adapter"
            )
