"""A minimal safetensors reader (header validated before any data is used),
so the packed reader needs numpy alone."""

import json
import struct

import numpy as np

# The safetensors crate's header limit, which kv-compress's writer respects.
MAX_HEADER_BYTES = 100_000_000

DTYPES = {"U8": np.uint8, "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


def read(path):
    """Returns (metadata dict, {name: (dtype string, shape, bytes)}) of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SafetensorsError(f"{path}: {len(data)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise SafetensorsError(f"{path}: header length {header_len} does not fit the {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ is not a string-to-string map")
    body = data[8 + header_len :]
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r}: dtype {dtype} is not one of {sorted(DTYPES)}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(begin, int) and isinstance(end, int)):
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed shape or offsets")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * np.dtype(DTYPES[dtype]).itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r}: offsets {begin}..{end} do not hold shape {shape} of {dtype}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, list(shape), body[begin:end])
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SafetensorsError(f"{path}: tensor {name!r}: data at {begin}, expected {position} (gap or overlap)")
        position = end
    if position != len(body):
        raise SafetensorsError(f"{path}: tensor data ends at {position}, the file's data is {len(body)} bytes")
    return metadata, tensors
