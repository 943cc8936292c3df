"""Writes the hostile adapter files of tests/corpus/adapters/ (run from anywhere; they are committed).

Each is a safetensors file built byte by byte, so that every malformation is exactly the one named.
The factors fit the tiny test model's first block (hidden size 32, rank 2).
"""

import json
import os
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
Q = "transformer.transformer_blocks.0.attn1.to_q"


def safetensors_bytes(tensors: dict, metadata=None, header_override=None) -> bytes:
    """A safetensors file of float32 arrays; `header_override` replaces the header JSON text."""
    header, data = {}, b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = (header_override if header_override is not None else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


def factors(a_value=0.01, b_value=0.01) -> dict:
    return {f"{Q}.lora_A.weight": np.full((2, 32), a_value), f"{Q}.lora_B.weight": np.full((32, 2), b_value)}


def entry(**fields) -> str:
    return json.dumps({f"{Q}.lora_A.weight": fields})


HOSTILE = {
    "nan.safetensors": safetensors_bytes(factors(a_value=float("nan"))),
    "inf.safetensors": safetensors_bytes(factors(b_value=float("inf"))),
    "huge.safetensors": safetensors_bytes(factors(a_value=3e38)),
    "alpha_nan.safetensors": safetensors_bytes(factors(), metadata={"lora_alpha": "nan"}),
    "deep.safetensors": safetensors_bytes({}, header_override="[" * 100_000 + "]" * 100_000),
    "entry_not_object.safetensors": safetensors_bytes({}, header_override='{"a": 1}'),
    "offsets_not_numbers.safetensors": safetensors_bytes(
        {}, header_override=entry(dtype="F32", shape=[2, 32], data_offsets="xx")
    ),
    "no_shape.safetensors": safetensors_bytes({}, header_override=entry(dtype="F32", data_offsets=[0, 0])),
    "offsets_disagree.safetensors": safetensors_bytes(
        {}, header_override=entry(dtype="F32", shape=[2, 32], data_offsets=[0, 8])
    )
    + b"\0" * 8,
    "metadata_not_strings.safetensors": safetensors_bytes(factors(), metadata={"lora_alpha": {"nested": 1}}),
}


if __name__ == "__main__":
    for name, data in HOSTILE.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    zero = os.path.join(HERE, "zero.safetensors")
    if not os.path.islink(zero):
        os.symlink("/dev/zero", zero)  # an endless file behind an innocent name
