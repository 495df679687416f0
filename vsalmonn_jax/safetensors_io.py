"""Streaming safetensors reader/writer: one tensor at a time via memory maps, bf16 included.

Used by every importer/exporter (Qwen2, SigLIP, Whisper, LLaVA-OneVision, the official release) so a
7B checkpoint is never held twice in memory. Handles single files and `*.safetensors.index.json` shards.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape/dtype, or is unreadable."""


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Lazy access to all tensors of a checkpoint directory or file: `reader[name] -> np.memmap view`."""

    def __init__(self, path: str | pathlib.Path):
        path = pathlib.Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self.path = path
        self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for file in files:
            header, data_start = _read_header(file)
            for name, info in header.items():
                self._where[name] = (file, info, data_start)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._info(name)[1]["dtype"]
        if code not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return np.dtype(_DTYPES[code])

    def header_digest(self) -> str:
        """sha256 of every tensor's (file, name, dtype, shape, offsets): identifies the checkpoint
        without reading its data."""
        import hashlib

        digest = hashlib.sha256()
        for name in self.keys():
            file, info, _ = self._where[name]
            digest.update(json.dumps([file.name, name, info["dtype"], info["shape"],
                                      info["data_offsets"]]).encode())
        return digest.hexdigest()

    def _info(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self._where[name]

    def __getitem__(self, name: str) -> np.ndarray:
        file, info, data_start = self._info(name)
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} byte size does not match shape {shape}")
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor, checked against the expected shape (error names the tensor)."""
        array = self[name]
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        return array


def write_safetensors(path: str | pathlib.Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a small {name: array} dict (tests, adapters). Large models: `write_safetensors_lazy`."""
    entries = [(n, np.shape(a), np.asarray(a).dtype, (lambda a=a: np.asarray(a))) for n, a in tensors.items()]
    write_safetensors_lazy(path, entries, metadata)


def write_safetensors_lazy(path, entries, metadata: dict[str, str] | None = None) -> None:
    """entries: [(name, shape, dtype, produce() -> np.ndarray)]; each produced, written, released."""
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce(), dtype=np.dtype(dtype))
            if tuple(array.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r}: produced shape {array.shape}, declared {shape}")
            f.write(array.tobytes())


def iter_tensors(reader: SafetensorsReader) -> Iterator[tuple[str, np.ndarray]]:
    for name in reader.keys():
        yield name, reader[name]
