"""Hugging Face weight files, one tensor at a time.

Reading (:class:`HFWeights`): names, shapes and dtypes come from the safetensors headers (no
tensor data is touched); a tensor is read by opening its file, copying that one tensor out
and closing the file again, so no mapping of a multi-GB shard stays resident. Accepted
layouts: ``model.safetensors``, ``model.safetensors.index.json`` + shards, and, only through
``torch.load(weights_only=True)``, ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``.

Writing (:class:`SafetensorsShardWriter`): the shard plan (names, shapes, dtypes) is known in
advance, so each shard's header is written first and tensors are appended as they are
produced: memory stays at one tensor whatever the shard size.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_mft.checkpoint.hf.families import ConversionError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data section) of a safetensors file; a truncated or corrupt file (a
    header that does not parse, tensors that end past the end of the file) is a ConversionError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit in the file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConversionError(f"damaged safetensors file {path} ({size} bytes):", [str(e)]) from None
    if 8 + n + end > size:
        raise ConversionError(f"damaged safetensors file {path}:",
                              [f"truncated: its tensors end at byte {8 + n + end}, the file has {size} bytes"])
    return header, 8 + n


class HFWeights:
    """The tensors of a Hugging Face model folder, by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        #: safetensors: name -> absolute byte range of the tensor's data in its file
        self.ranges: dict[str, tuple[int, int]] = {}
        self.format = ""
        st_index = self.folder / "model.safetensors.index.json"
        bin_index = self.folder / "pytorch_model.bin.index.json"
        if st_index.is_file():
            self._index(st_index, self._safetensors_meta)
        elif (self.folder / "model.safetensors").is_file():
            self._safetensors_meta(self.folder / "model.safetensors", None)
        elif bin_index.is_file():
            self._index(bin_index, self._bin_meta)
        elif (self.folder / "pytorch_model.bin").is_file():
            self._bin_meta(self.folder / "pytorch_model.bin", None)
        else:
            raise ConversionError(f"no weights in {self.folder}:", [
                "expected model.safetensors, model.safetensors.index.json (+ shards), pytorch_model.bin "
                "or pytorch_model.bin.index.json"])

    # ------------------------------------------------------------ metadata
    def _index(self, index: Path, read_meta) -> None:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        problems = []
        by_file: dict[str, set] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, set()).add(name)
        for fname, names in sorted(by_file.items()):
            path = self.folder / fname
            if not path.is_file():
                problems.append(f"{fname} (listed in {index.name} for {len(names)} tensors, e.g. {min(names)}) "
                                f"does not exist")
                continue
            read_meta(path, names)
        if problems:
            raise ConversionError(f"incomplete checkpoint {self.folder}:", problems)

    def _safetensors_meta(self, path: Path, expected: Optional[set]) -> None:
        self.format = "safetensors"
        header, start = read_safetensors_header(path)
        header.pop("__metadata__", None)
        for name, info in header.items():
            if expected is not None and name not in expected:
                continue  # listed for another file by the index; trust the index
            self.files[name] = path
            self.shapes[name] = tuple(info["shape"])
            self.dtypes[name] = _ST_DTYPES.get(info["dtype"], info["dtype"])
            b, e = info["data_offsets"]
            self.ranges[name] = (start + b, start + e)
        absent = sorted((expected or set()) - set(header))
        if absent:
            raise ConversionError(f"incomplete checkpoint {self.folder}:",
                                  [f"{name}: the index names {path.name}, which does not hold it" for name in absent])

    def _bin_meta(self, path: Path, expected: Optional[set]) -> None:
        self.format = "pytorch_model.bin"
        sd = self._load_bin(path)
        for name, t in sd.items():
            if expected is not None and name not in expected:
                continue
            self.files[name] = path
            self.shapes[name] = tuple(t.shape)
            self.dtypes[name] = t.dtype
        del sd

    @staticmethod
    def _load_bin(path: Path) -> dict:
        try:  # zip format: mmap, so only the tensors touched are read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)

    # ---------------------------------------------------------------- data
    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file straight into a new tensor (no mapping of the file,
        so nothing but the tensor itself becomes resident)."""
        path = self.files[name]
        if self.format == "safetensors":
            dtype = self.dtypes[name]
            if not isinstance(dtype, torch.dtype):
                raise ConversionError(f"{path.name}:", [f"{name}: unsupported dtype {dtype}"])
            b, e = self.ranges[name]
            t = torch.empty(self.shapes[name], dtype=dtype)
            if t.nbytes != e - b:
                raise ConversionError(f"{path.name}:", [f"{name}: {e - b} bytes for shape {list(t.shape)} {dtype}"])
            if t.nbytes:
                # read into the tensor's memory through ctypes: a numpy view would pin the storage
                # (writers free written tensors by resizing their storage)
                buf = (ctypes.c_char * t.nbytes).from_address(t.data_ptr())
                with open(path, "rb") as f:
                    f.seek(b)
                    if f.readinto(buf) != t.nbytes:
                        raise ConversionError(f"{path.name}:", [f"{name}: file ends inside the tensor"])
            return t
        sd = self._load_bin(path)
        t = sd[name].clone()
        del sd
        return t


def shard_plan(items: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Group items (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards, cur, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(items):
        n = _nbytes(shape, dtype)
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        shards.append(cur)
    return shards


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsShardWriter:
    """Write ``items`` (name, shape, dtype) in order into transformers-style sharded safetensors
    (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``; a single
    ``model.safetensors`` when everything fits one shard), one tensor in memory at a time."""

    def __init__(self, out_dir: str | Path, items: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        self.out = Path(out_dir)
        self.items = items
        self.shards = shard_plan(items, max_shard_bytes)
        n = len(self.shards)
        self.file_names = (["model.safetensors"] if n == 1 else
                           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.order = [i for shard in self.shards for i in shard]
        self.next = 0
        self._file = None
        self._shard = -1
        self._remaining = 0

    def _open_shard(self, s: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.shards[s]:
            name, shape, dtype = self.items[i]
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out / self.file_names[s], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._shard, self._remaining = s, len(self.shards[s])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order):
            raise RuntimeError(f"{name}: all {len(self.order)} planned tensors are already written")
        exp_name, shape, dtype = self.items[self.order[self.next]]
        if name != exp_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {exp_name} {tuple(shape)} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._remaining == 0:
            self._open_shard(self._shard + 1)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._remaining -= 1
        self.next += 1
        if self._remaining == 0:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        if self.next != len(self.order):
            missing = [self.items[i][0] for i in self.order[self.next:]]
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        if len(self.shards) > 1:
            weight_map = {self.items[i][0]: self.file_names[s] for s, shard in enumerate(self.shards) for i in shard}
            total = sum(_nbytes(shape, dtype) for _, shape, dtype in self.items)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.file_names


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``1000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]] if unit != "B" else 0
    return int(float(m.group(1)) * base ** power)


def copy_files(src: str | Path, dst: str | Path, names: Iterable[str]) -> list[str]:
    """Copy those of ``names`` that exist in ``src`` to ``dst``; return the copied names."""
    import shutil

    src, dst = Path(src), Path(dst)
    copied = []
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
