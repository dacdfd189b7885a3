"""Stream tensors to a sharded safetensors checkpoint without ever holding a shard in memory.

Every output header is known before the first byte is written (names, dtypes and shapes
come from the input headers), so the writer lays out all shards up front and then only
appends tensor bytes, in order, from a background thread that overlaps the caller's
compute. Output goes to a hidden temporary folder beside the target; `commit()` fsyncs
and renames it into place, and any failure (an exception, a full disk, a killed process)
leaves nothing at the target.

>>> plan = [OutTensor("w", "F32", (2, 2))]                          # doctest: +SKIP
>>> with CheckpointWriter("out", plan, metadata={"note": "x"}) as w:  # doctest: +SKIP
...     w.write(torch.ones(2, 2))
...     w.commit()
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import DTYPE_INFO, INDEX_NAME, SINGLE_NAME
from .errors import OptionError, OutputError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = "5GB"
WRITEBACK_BYTES = 64 << 20  # start the disk write of every 64 MiB at once, so the final fsync is short
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes in a size like "5GB" (powers of ten, as transformers reads it) or "512MiB".

    >>> parse_size("5GB"), parse_size("1MiB"), parse_size(1000)
    (5000000000, 1048576, 1000)
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise OptionError(f"cannot read size {size!r}", hint="write it like 5GB, 500MB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise OptionError(f"size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class OutTensor:
    """One tensor the output will hold: its name, safetensors dtype tag and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_INFO[self.dtype][0]


def plan_shards(tensors: Sequence[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor
    sits alone), the way transformers' save_pretrained does."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names transformers uses: one model.safetensors, or model-0000i-of-0000N.safetensors."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(tensors: Iterable[OutTensor], metadata: dict[str, str]) -> bytes:
    """A complete safetensors header (length prefix, JSON, space padding to 8 bytes)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def fresh_work_folder(out: Path, command: str) -> Path:
    """An empty folder for `command`'s working output (a report, a demo), replacing one it wrote before.

    A marker file names the command; any other non-empty folder (another command's included) is
    refused, so a typo in --out never deletes somebody's files.

    >>> fresh_work_folder(Path("pdelta-demo"), "pdelta demo")   # doctest: +SKIP
    """
    marker, stamp = out / ".pdelta-work", f"written by `{command}`; its next run replaces this folder\n"
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (marker.is_file() and marker.read_text() == stamp)):
            raise OptionError(f"{out} exists and was not written by `{command}`",
                              hint="pass --out NEW_FOLDER (only the command's own earlier output is replaced)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    marker.write_text(stamp)
    return out


def check_target(out: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """Refuse an output that is, contains or sits inside an input, or that would clobber files."""
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if src.is_file():
            src = src.parent
        if target == src or src in target.parents or target in src.parents:
            raise OutputError(f"output {out} overlaps input {inp}",
                              hint="choose an output folder outside every input folder")
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {out} exists and is a file", hint="choose a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} is not empty", hint="pass --overwrite or choose a new folder")


_STOP = object()


class CheckpointWriter:
    """Write planned tensors, in order, into a temporary folder beside `out`; rename on commit.

    Call `write()` with consecutive pieces of each tensor in plan order (rows or flat
    chunks, any sizes that add up). Side files go into `self.dir` before `commit()`.
    """

    def __init__(self, out: str | os.PathLike, tensors: Sequence[OutTensor], *,
                 max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, metadata: dict[str, str] | None = None,
                 overwrite: bool = False, inputs: Iterable[Path] = (), queue_depth: int = 8):
        self.out = Path(out)
        check_target(self.out, inputs, overwrite)
        self.overwrite = overwrite
        self.shards = plan_shards(tensors, parse_size(max_shard_size))
        self.names = shard_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self.dir = self.out.parent / f".{self.out.name}.pdelta-tmp-{os.getpid()}-{secrets.token_hex(3)}"
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # position in the plan: (shard index, tensor index, bytes still due for that tensor)
        self._flat = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._due = self._flat[0][1].nbytes if self._flat else 0
        self._committed = False

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.out)
        self.dir.mkdir()
        self._thread = threading.Thread(target=self._drain, name="pdelta-writer", daemon=True)
        self._thread.start()
        self._queue.put(("open", 0))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self._stop_thread()
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for _, t in self._flat)

    # -- writing -------------------------------------------------------------------------
    def write(self, data: torch.Tensor, release: Callable[[], None] | None = None) -> None:
        """Append a contiguous piece of the current tensor; `release()` runs once its bytes are on disk.

        The writer keeps a reference to `data` until then, so the caller must not change it
        before `release` is called (pass `release` to recycle buffers).
        """
        self._raise_pending()
        nbytes = data.numel() * data.element_size()
        while self._due == 0 and self._pos < len(self._flat):
            self._advance()
        if self._pos >= len(self._flat):
            raise RuntimeError("write past the end of the plan")
        name = self._flat[self._pos][1]
        if nbytes > self._due:
            raise RuntimeError(f"{name.name}: got {nbytes} bytes, only {self._due} due")
        if data.dtype != _torch_dtype(name.dtype):
            raise RuntimeError(f"{name.name}: got {data.dtype}, planned {name.dtype}")
        self._queue.put(("data", (data, release)))
        self._due -= nbytes
        if self._due == 0:
            self._advance()

    def _advance(self) -> None:
        shard = self._flat[self._pos][0]
        self._pos += 1
        while self._pos < len(self._flat) and self._flat[self._pos][1].nbytes == 0:
            self._pos += 1  # empty tensors need no bytes
        if self._pos < len(self._flat):
            self._due = self._flat[self._pos][1].nbytes
            if self._flat[self._pos][0] != shard:
                self._queue.put(("open", self._flat[self._pos][0]))

    def commit(self) -> Path:
        """Finish the last shard, write the index, fsync and move the folder into place."""
        if self._pos < len(self._flat):
            missing = self._flat[self._pos][1].name
            raise RuntimeError(f"commit before every tensor was written (next: {missing})")
        self._queue.put(("close", None))
        self._stop_thread()
        self._raise_pending()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {t.name: self.names[s] for s, t in self._flat}}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        _fsync_dir(self.dir)
        old = None
        if self.out.exists():
            if self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            else:
                if not self.overwrite:  # someone filled it while we worked
                    raise OutputError(f"output folder {self.out} is not empty", hint="pass --overwrite")
                old = self.out.parent / f".{self.out.name}.pdelta-old-{secrets.token_hex(3)}"
                self.out.rename(old)
        self.dir.rename(self.out)
        self._committed = True
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    # -- the background thread ----------------------------------------------------------
    def _drain(self) -> None:
        f = None
        written = flushed = 0  # bytes of the current shard written, and handed to writeback
        while True:
            kind, item = self._queue.get()
            if kind is _STOP:
                break
            if self._error is not None:
                if kind == "data" and item[1] is not None:
                    item[1]()
                continue
            try:
                if kind == "open":
                    f = _close(f, sync=False)
                    f = open(self.dir / self.names[item], "wb")
                    written = f.write(encode_header(self.shards[item], self.metadata))
                    flushed = 0
                elif kind == "data":
                    data, release = item
                    written += f.write(memoryview(data.reshape(-1).view(_uint8()).numpy()))
                    if release is not None:
                        release()
                    if written - flushed >= WRITEBACK_BYTES:
                        f.flush()
                        _start_writeback(f.fileno(), flushed, written - flushed)
                        flushed = written
                elif kind == "close":
                    f = _close(f, sync=False)
                    for name in self.names:  # one fsync per shard at the end; the kernel flushed the rest meanwhile
                        _fsync_file(self.dir / name)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
                if kind == "data" and item[1] is not None:
                    item[1]()
                f = _close_quietly(f)
        _close_quietly(f)

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put((_STOP, None))
            self._thread.join()
        self._thread = None

    def _raise_pending(self) -> None:
        if self._error is not None:
            e = self._error
            if isinstance(e, OSError):
                raise OutputError(f"writing {self.out} failed: {e.strerror or e}",
                                  hint="free disk space or choose another output folder") from e
            raise e


def _close(f, sync: bool = True):
    if f is not None and not f.closed:
        if sync:
            f.flush()
            os.fsync(f.fileno())
        f.close()
    return None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): queue dirty pages for disk without waiting.

    The disk then writes while we compute, instead of all at the end in fsync; elsewhere a no-op.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.sync_file_range(fd, offset, nbytes, 2)


_libc = None


def _close_quietly(f):
    """Close after a failed write: the flush fails again, but the descriptor is released anyway."""
    try:
        _close(f, sync=False)
    except OSError:
        pass
    return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(out: Path) -> None:
    """Delete temp folders left beside `out` by runs that were killed (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}.pdelta-tmp-*"):
        pid = p.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _torch_dtype(tag: str):
    from .checkpoint import torch_dtype

    return torch_dtype(tag)


def _uint8():
    import torch

    return torch.uint8


def write_json(path: Path, data: dict) -> None:
    """Write JSON the way transformers does (indented, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
