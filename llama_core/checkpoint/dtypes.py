"""Tensor element types shared by the checkpoint formats, and exact casts between them.

One vocabulary (safetensors' short names: F32, BF16, ...) maps to MindSpore checkpoint type
strings and to numpy storage types. numpy has no bfloat16 here (and MindSpore's numpy bfloat16
refuses numpy 2), so BF16 tensors are held as their uint16 bit patterns and cast by bit shifts.
"""

from __future__ import annotations

import numpy as np

from llama_core.errors import InputError

# short name -> (MindSpore checkpoint type string, numpy storage dtype)
_TYPES: dict[str, tuple[str, np.dtype]] = {
    "F64": ("Float64", np.dtype("<f8")),
    "F32": ("Float32", np.dtype("<f4")),
    "F16": ("Float16", np.dtype("<f2")),
    "BF16": ("BFloat16", np.dtype("<u2")),
    "I64": ("Int64", np.dtype("<i8")),
    "I32": ("Int32", np.dtype("<i4")),
    "I16": ("Int16", np.dtype("<i2")),
    "I8": ("Int8", np.dtype("i1")),
    "U64": ("UInt64", np.dtype("<u8")),
    "U32": ("UInt32", np.dtype("<u4")),
    "U16": ("UInt16", np.dtype("<u2")),
    "U8": ("UInt8", np.dtype("u1")),
    "BOOL": ("Bool", np.dtype("bool")),
}
_FROM_MS = {ms: short for short, (ms, _) in _TYPES.items()}

# --dtype choices of the converters
CLI_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
FLOAT_TYPES = ("F64", "F32", "F16", "BF16")


def storage_dtype(short: str) -> np.dtype:
    """numpy dtype holding a tensor of type `short` (BF16 -> uint16 bit patterns)."""
    return _TYPES[short][1]


def to_ms_type(short: str) -> str:
    """'F32' -> 'Float32' (the tensor_type string of a MindSpore .ckpt)."""
    return _TYPES[short][0]


def from_ms_type(ms_type: str, where: str) -> str:
    """'Float32' -> 'F32'; `where` names the tensor in the error for an unknown type."""
    try:
        return _FROM_MS[ms_type]
    except KeyError:
        raise InputError(f"{where}: unsupported tensor type {ms_type!r}") from None


def check_short(short: str, where: str) -> str:
    """Validate a safetensors dtype name."""
    if short not in _TYPES:
        raise InputError(f"{where}: unsupported tensor type {short!r}")
    return short


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast a float tensor held in `src` storage to `dst` storage (round to nearest even for BF16).

    Returns `array` itself when the types are equal.
    """
    if src == dst:
        return array
    if src not in FLOAT_TYPES or dst not in FLOAT_TYPES:
        raise ValueError(f"cannot cast {src} to {dst}")
    wide = _bf16_to_f32(array) if src == "BF16" else array
    if dst == "BF16":
        return _f32_to_bf16(wide.astype(np.float32, copy=False))
    return wide.astype(storage_dtype(dst))


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    bits = values.view(np.uint32)
    # Round to nearest, ties to even (what torch and MindSpore do); NaNs stay quiet NaNs.
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded
