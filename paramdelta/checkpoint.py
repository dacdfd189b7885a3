"""Open a checkpoint folder lazily: headers first, weights as zero-copy views on demand.

A checkpoint is a folder with `model.safetensors`, or shards plus
`model.safetensors.index.json`, and the usual side files (config, tokenizer). Opening
one reads only the JSON headers and checks them hard (truncation, overlaps, an index
that points outside the folder, a tensor listed twice), so every problem surfaces before
a weight byte is touched. Tensors are then read as views on a memory map of the shard,
which costs no allocation and lets the kernel stream pages from disk.

>>> ckpt = Checkpoint.open("path/to/model")                      # doctest: +SKIP
>>> ckpt.tensors["model.norm.weight"].shape                       # doctest: +SKIP
(4096,)
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tag -> (bytes per element, torch dtype name)
DTYPE_INFO: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
    "U8": (1, "uint8"), "U16": (2, "uint16"), "U32": (4, "uint32"), "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
TAG_BY_TORCH_NAME = {name: tag for tag, (_, name) in DTYPE_INFO.items()}

# Side files that travel with a checkpoint, by role (see DESIGN.md §2: three roles, three sources).
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def torch_dtype(tag: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype tag ("BF16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPE_INFO[tag][1])


def dtype_tag(dtype: torch.dtype | str) -> str:
    """The safetensors tag for a torch dtype or a name like "bfloat16"."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    try:
        return TAG_BY_TORCH_NAME[name]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, byte range in it, dtype tag and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_TAGS


@dataclass
class ShardHeader:
    """A parsed safetensors header: tensors in byte order, and the free-form metadata."""

    file: Path
    tensors: list[TensorInfo]
    metadata: dict[str, str]
    header_bytes: bytes = field(repr=False)
    size: int | None = None  # bytes in the whole file (known before download for Hub shards)


def read_shard_header(file: Path) -> ShardHeader:
    """Parse and validate one safetensors header without reading tensor data.

    Raises CheckpointError naming the file for a truncated file, a corrupt header, a bad
    dtype, offsets that disagree with the shape, or tensors that overlap.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(header_length(file, f.read(8), size))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    return parse_shard_header(file, raw, size)


def header_length(file: Path, prefix: bytes, size: int) -> int:
    """The JSON header length announced by a safetensors file's first 8 bytes, checked against its size."""
    if len(prefix) < 8:
        raise CheckpointError(f"{file}: truncated ({size} bytes, no safetensors header)",
                              hint="re-download or re-save this shard")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{file}: corrupt or truncated header (claims {n} bytes, file has {size})",
                              hint="re-download or re-save this shard")
    return n


def parse_shard_header(file: Path, raw: bytes, size: int) -> ShardHeader:
    """Validate the JSON header `raw` of a safetensors file of `size` bytes (see read_shard_header)."""
    n = len(raw)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})",
                              hint="re-download or re-save this shard") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors = []
    for name, spec in header.items():
        try:
            tag, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}",
                                  hint="re-download or re-save this shard") from None
        if tag not in DTYPE_INFO:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {tag!r}")
        expected = math.prod(shape) * DTYPE_INFO[tag][0]
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{file}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                                  f"{tag} needs {expected}", hint="re-download or re-save this shard")
        if end > data_size:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size}", hint="re-download this shard; it is incomplete")
        tensors.append(TensorInfo(name, tag, shape, file, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: t.start)
    for a, b in zip(tensors, tensors[1:]):
        if b.start < a.end:
            raise CheckpointError(f"{file}: tensors {a.name!r} and {b.name!r} overlap",
                                  hint="re-save this shard")
    return ShardHeader(file, tensors, {str(k): str(v) for k, v in metadata.items()}, raw, size)


class Checkpoint:
    """A checkpoint folder opened from its headers; weights are read only on request.

    `tensors` is ordered as the bytes lie on disk (shard by shard, offset by offset), the
    order in which a streaming pass reads fastest.
    """

    def __init__(self, path: Path, shards: list[ShardHeader], pickled: dict[str, Any] | None = None):
        self.path = path
        self.shards = shards
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for t in shard.tensors:
                if t.name in self.tensors:
                    raise CheckpointError(
                        f"{path}: tensor {t.name!r} is listed twice ({self.tensors[t.name].file.name} and "
                        f"{t.file.name})", hint="remove the duplicate shard or fix the checkpoint")
                self.tensors[t.name] = t
        self._pickled = pickled
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self.remote: Any = None  # hub.ShardSource for a Hub reference: fetches a shard before its first read


    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
        """Open a local checkpoint folder (or a single .safetensors file) from its headers.

        A Hub reference `org/name[@revision]` that is not a local path opens from the Hub: config,
        index and tokenizer files are downloaded, shard headers read by HTTP range (see hub.py).
        """
        from . import hub

        if hub.is_ref(path):
            return hub.open_ref(os.fspath(path))
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            return cls(path.parent, [read_shard_header(path)])
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder",
                                  hint="pass a folder holding model.safetensors or a sharded index")
        index = path / INDEX_NAME
        if index.is_file():
            return cls(path, _shards_from_index(index))
        if (path / SINGLE_NAME).is_file():
            return cls(path, [read_shard_header(path / SINGLE_NAME)])
        loose = sorted(path.glob("*.safetensors"))
        if len(loose) == 1:
            return cls(path, [read_shard_header(loose[0])])
        if any((path / n).exists() for n in PICKLE_NAMES) or list(path.glob("pytorch_model-*.bin")):
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: holds only pickled PyTorch weights (.bin), which can run code when loaded",
                    hint="convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
            return cls._open_pickle(path)
        raise CheckpointError(f"{path}: no model.safetensors or {INDEX_NAME} found",
                              hint="pass the folder that holds the model weights")

    @classmethod
    def _open_pickle(cls, path: Path) -> Checkpoint:
        import torch

        files = sorted(path.glob("pytorch_model*.bin"))
        state: dict[str, Any] = {}
        shards = []
        for f in files:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds here
                raise CheckpointError(f"{f}: cannot load with weights_only=True ({type(e).__name__})",
                                      hint="convert this checkpoint to safetensors with a trusted tool") from None
            infos = []
            for name, t in part.items():
                t = t.contiguous()
                state[name] = t
                infos.append(TensorInfo(name, dtype_tag(t.dtype), tuple(t.shape), f, 0, t.numel() * t.element_size()))
            shards.append(ShardHeader(f, infos, {}, b""))
        return cls(path, shards, pickled=state)

    # -- side files ----------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, Any]:
        """The parsed config.json, or {} when the folder has none."""
        f = self.path / "config.json"
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text())
        except ValueError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None

    @cached_property
    def vocab(self) -> dict[str, int] | None:
        """Token string -> id from tokenizer.json, or None when the folder has no fast tokenizer."""
        f = self.path / "tokenizer.json"
        if not f.is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True)

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether lm_head shares the embedding, with transformers' default when unset."""
        if "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        if "text_config" in self.config and "tie_word_embeddings" in self.config["text_config"]:
            return bool(self.config["text_config"]["tie_word_embeddings"])
        return "lm_head.weight" not in self.tensors and any("embed" in n for n in self.tensors)

    @property
    def files(self) -> list[Path]:
        return [s.file for s in self.shards]

    @property
    def metadata(self) -> dict[str, str]:
        """The first shard's safetensors metadata (where paramdelta writes provenance)."""
        return self.shards[0].metadata if self.shards else {}

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # -- reading -------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """A read-only view of one tensor, backed by the file's memory map (no copy)."""
        import torch

        info = self.tensors[name]
        if self._pickled is not None:
            return self._pickled[name]
        dtype = torch_dtype(info.dtype)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the map is read-only and we never write through it
            flat = torch.frombuffer(self._map(info.file), dtype=dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def read_into(self, name: str, first: int, out: torch.Tensor) -> torch.Tensor:
        """Copy elements [first, first + out.numel()) of a flattened tensor into `out` (same dtype).

        A plain pread: on Linux it copies from the page cache faster than faulting in a
        memory map, and it allocates nothing, so the hot loop of `apply` uses it.
        """
        info = self.tensors[name]
        if self._pickled is not None:
            return out.copy_(self._pickled[name].reshape(-1)[first:first + out.numel()])
        size = DTYPE_INFO[info.dtype][0]
        view = memoryview(out.view(_uint8()).numpy()).cast("B")
        pos, done, fd = info.start + first * size, 0, self._fd(info.file)
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}",
                                      hint="the shard changed or is truncated; re-download it")
            done += got
        return out

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (async read-ahead)."""
        info = self.tensors[name]
        if self.remote is not None and info.file not in self._fds and not info.file.exists():
            return  # a Hub shard still downloading: reading ahead must not wait for it
        if self._pickled is None and info.numel and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(info.file), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)

    def release(self, file: Path) -> None:
        """Close one shard's handle and map, so that deleting it frees the disk (views stay valid)."""
        self._maps.pop(file, None)
        fd = self._fds.pop(file, None)
        if fd is not None:
            os.close(fd)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            if self.remote is not None:
                self.remote.wait(file)
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            if self.remote is not None:
                self.remote.wait(file)
            with open(file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = mm
        return mm

    def close(self) -> None:
        """Release maps and file handles; views handed out before stay valid until collected."""
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.tensors)}, shards={len(self.shards)})"


def _uint8():
    import torch

    return torch.uint8


def _shards_from_index(index: Path, read_header: Callable[[Path], ShardHeader] | None = None) -> list[ShardHeader]:
    """Headers of the shards an index names, each checked to be a real file inside the folder
    (`read_header` reads them from elsewhere instead, e.g. the Hub, before they are downloaded)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})",
                              hint="re-download the index or re-save the checkpoint") from None
    folder = index.parent.resolve()
    shards: list[Path] = []
    for tensor, name in weight_map.items():
        # a plain file name; not resolved, since a Hub cache snapshot holds symlinks into its blobs/
        target = folder / str(name)
        if Path(str(name)).name != str(name) or str(name) in (".", ".."):
            raise CheckpointError(f"{index}: tensor {tensor!r} points outside the folder ({name!r})",
                                  hint="shard names in weight_map must be plain file names")
        if read_header is None and not target.is_file():
            raise CheckpointError(f"{index}: tensor {tensor!r} points to missing shard {name!r}",
                                  hint="download the missing shard")
        if target not in shards:
            shards.append(target)
    listed = set(weight_map)
    # Headers must agree with the index: every listed tensor present in its shard, nothing extra.
    headers = {f: (read_header or read_shard_header)(f) for f in sorted(shards)}
    for tensor, name in weight_map.items():
        if all(t.name != tensor for t in headers[folder / str(name)].tensors):
            raise CheckpointError(f"{index}: tensor {tensor!r} is not in shard {name!r}",
                                  hint="the index and shards disagree; re-download the checkpoint")
    for f, h in headers.items():
        extra = [t.name for t in h.tensors if t.name not in listed]
        if extra:
            raise CheckpointError(f"{f}: tensor {extra[0]!r} is in the shard but not in the index",
                                  hint="the index and shards disagree; re-download the checkpoint")
    return list(headers.values())
