"""Streaming safetensors reader/writer: one tensor at a time via memory maps, bf16 included.

Used by every importer/exporter (Qwen2, SigLIP, Whisper, LLaVA-OneVision, the official release) so a
7B checkpoint is never held twice in memory. Handles single files and `*.safetensors.index.json` shards.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct
import sys
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
    """(header without __metadata__, offset of the data); a file shorter than its header says (a
    partial download) -> CheckpointError "<file>: truncated: N bytes of M"."""
    actual = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if 8 + size > actual:
            raise CheckpointError(_truncated(path, actual, 8 + size))
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header (bad data_offsets: {err})") from err
    if 8 + size + end > actual:
        raise CheckpointError(_truncated(path, actual, 8 + size + end))
    return header, 8 + size


def _truncated(path: pathlib.Path, actual: int, expected: int) -> str:
    return (f"{path}: truncated: {actual} bytes of {expected} (an interrupted copy or download? "
            "fetch the file again)")


def _index_files(index: pathlib.Path) -> dict[pathlib.Path, list[str]]:
    """{shard: [tensor names]} of a `*.safetensors.index.json` (its weight_map); a shard it names
    that is absent -> CheckpointError naming it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        items = sorted(weight_map.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: unreadable shard index ({type(err).__name__}: {err})") from err
    shards: dict[pathlib.Path, list[str]] = {}
    for name, file in items:
        shards.setdefault(index.parent / str(file), []).append(name)
    absent = [f.name for f in shards if not f.is_file()]
    if absent:
        raise CheckpointError(f"{index} names {len(absent)} shard(s) that are not there: "
                              f"{', '.join(absent[:5])} (a partial download? fetch them again)")
    return shards


def checkpoint_files(path: pathlib.Path) -> tuple[list[pathlib.Path], dict[pathlib.Path, list[str]]]:
    """(safetensors files to read, {shard: names its index promises}) of a file, an index file or a
    directory: a directory with one `*.safetensors.index.json` reads only that index's shards
    (others beside them are named on stderr and ignored); without an index, every `*.safetensors`."""
    if path.name.endswith(".safetensors.index.json"):
        shards = _index_files(path)
        return sorted(shards), shards
    if not path.is_dir():
        return [path], {}
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: holds {len(indexes)} shard indexes "
                              f"({', '.join(i.name for i in indexes)}): keep one, or point at it")
    if not indexes:
        return _without_variants(path)
    shards = _index_files(indexes[0])
    ignored = sorted(set(path.glob("*.safetensors")) - set(shards))
    if ignored:
        print(f"weights: {path}: {', '.join(f.name for f in ignored)} not in {indexes[0].name}: "
              "ignored", file=sys.stderr)
    return sorted(shards), shards


# Hugging Face's weight variants beside the main file: model.fp32-00001-of-00002.safetensors (with
# model.safetensors.index.fp32.json), model.fp16.safetensors (openai/whisper-large-v3 has both kinds)
_VARIANT = re.compile(r"^[^.]+\.[A-Za-z0-9_]+(-\d{5}-of-\d{5})?\.safetensors$")


def _without_variants(path: pathlib.Path) -> tuple[list[pathlib.Path], dict[pathlib.Path, list[str]]]:
    """A directory without a main shard index: its main *.safetensors files, variant files (named
    by a `*.safetensors.index.<variant>.json` or `<name>.<variant>[-k-of-n].safetensors`) ignored
    with a note, as HF's from_pretrained does without `variant=`; only variant files: the one
    variant index's shards (several variants: an error naming them)."""
    files = set(path.glob("*.safetensors"))
    variant_indexes = sorted(path.glob("*.safetensors.index.*.json"))
    variants = {f for f in files if _VARIANT.match(f.name)}
    for index in variant_indexes:
        try:
            variants |= {path / str(f) for f in json.loads(index.read_text())["weight_map"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: unreadable shard index ({type(err).__name__}: {err})") \
                from err
    main = sorted(files - variants)
    if main:
        ignored = sorted(f.name for f in files & variants)
        if ignored:
            print(f"weights: {path}: variant files {', '.join(ignored)} ignored (reading "
                  f"{', '.join(f.name for f in main)})", file=sys.stderr)
        return main, {}
    if len(variant_indexes) == 1:
        shards = _index_files(variant_indexes[0])
        return sorted(shards), shards
    if len(variant_indexes) > 1:
        raise CheckpointError(f"{path}: holds only variant weights with {len(variant_indexes)} "
                              f"indexes ({', '.join(i.name for i in variant_indexes)}): keep one")
    return sorted(files), {}


class SafetensorsReader:
    """Lazy access to all tensors of a checkpoint directory or file: `reader[name] -> np.memmap view`.

    A directory with a `*.safetensors.index.json` reads the files of its weight_map only (a shard or
    a tensor it promises that is absent -> CheckpointError); one tensor in two files -> an error
    naming both (e.g. a stale model.safetensors beside shards)."""

    def __init__(self, path: str | pathlib.Path):
        path = pathlib.Path(path)
        files, promised = checkpoint_files(path)
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self.path = path
        self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for file in files:
            header, data_start = _read_header(file)
            lost = sorted(set(promised.get(file, ())) - set(header))
            if lost:
                raise CheckpointError(f"{file}: lacks {len(lost)} tensor(s) its index lists, e.g. "
                                      f"{lost[0]!r} (a stale or partial shard? fetch it again)")
            for name, info in header.items():
                if name in self._where:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {self._where[name][0]} and {file}: remove the "
                        "stale file (or add the shard index that says which to read)")
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
