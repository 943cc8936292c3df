"""The fp8 tier: the transformer's linear layers in float8 (torchao, one scale per output row),
with activations quantized on the fly. Faster matrix products on GPUs that have fp8 units (Ada,
Hopper and newer), at the cost of exactness: an fp8 render is not a bf16 render.

Adapter variants stay exact in their own way: a fused weight is computed from the pristine bf16
weights, exactly as the bf16 tier computes it, and then quantized per row, the same way torchao
quantized the base. So the base comes back bit for bit after any switches, and a variant is
bit-identical to quantizing the bf16 tier's fused weight (tests/gpu/test_speed_tiers.py).
"""

import json
import os
from collections.abc import Iterable, Iterator, Mapping

import safetensors
import torch

from common.errors import ModelError

CHUNK = 16  # layers quantized at once: bounds the fp32 temporary (16 layers of 5B: 0.6 GB)


def check_fp8_device(device: torch.device) -> None:
    """Refuse, with the reason, a device that cannot run the fp8 tier."""
    if device.type != "cuda":
        raise ModelError("precision fp8 needs a CUDA GPU with fp8 units (compute capability 8.9+: Ada, Hopper)")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ModelError(
            f"precision fp8 needs compute capability 8.9+ (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use bf16"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ModelError("precision fp8 needs torchao: pip install 'lorafleet[worker]'") from None


def quantize_transformer(transformer: torch.nn.Module) -> None:
    """Quantize every linear layer of the transformer (on its GPU) to per-row fp8, in place."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # set_inductor_config would turn on inductor's coordinate-descent tuning for the whole process:
    # it made a 5B compile take over eight minutes (the bf16 tiers' too, in a process serving both).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config)


def is_fp8(weight: torch.Tensor) -> bool:
    """Whether a layer's weight is a torchao float8 tensor (a layer torchao could not quantize stays bf16)."""
    return hasattr(weight, "qdata") and hasattr(weight, "scale")


def encode(stack: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High-precision weights [n, out, in] quantized as torchao quantized `like`: (fp8 data, scales)."""
    from torchao.quantization import Float8Tensor, PerRow

    data, scales = [], []
    for start in range(0, stack.shape[0], CHUNK):
        # Per row is per output channel, whatever the stacking: the same bits as one layer at a time.
        quantized = Float8Tensor.from_hp(
            stack[start : start + CHUNK],
            float8_dtype=like.qdata.dtype,
            granularity=PerRow(),
            kernel_preference=like.kernel_preference,
        )
        data.append(quantized.qdata)
        scales.append(quantized.scale)
    return torch.cat(data), torch.cat(scales)


def write(weights: list[torch.Tensor], encoded: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Copy encoded weights into the layers' fp8 data and scales, in place (never recompiles)."""
    data, scales = encoded
    torch._foreach_copy_([w.qdata for w in weights], list(data.unbind(0)))
    torch._foreach_copy_([w.scale for w in weights], list(scales.unbind(0)))


class SavedWeights(Mapping):
    """The transformer's linear weights as its pipeline folder stores them, read on demand (through
    mmap) in the weights' dtype: the bf16 weights from before quantization, which every variant is
    fused from, without holding a copy of them in host memory (11 GB on 5B)."""

    def __init__(self, model_ref: str, names: Iterable[str], dtype: torch.dtype):
        folder = transformer_folder(model_ref)
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            weight_map = None
        self.dtype = dtype
        self.files = {}
        for name in names:
            file = weight_map[f"{name}.weight"] if weight_map else "diffusion_pytorch_model.safetensors"
            self.files[name] = os.path.join(folder, file)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safetensors.safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(f"{name}.weight").to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def transformer_folder(model_ref: str) -> str:
    """Where a pipeline's transformer weights are: in its folder, or in the hub's local cache."""
    if os.path.isdir(model_ref):
        return os.path.join(model_ref, "transformer")
    from huggingface_hub import snapshot_download

    return os.path.join(
        snapshot_download(model_ref, allow_patterns=["transformer/*"], local_files_only=True), "transformer"
    )
