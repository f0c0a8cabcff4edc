"""The fast checkpoint path: :func:`stream_weights` reads a safetensors checkpoint through a ring
of staging buffers (pinned on CUDA) and runs each parameter's weight_loader on the device-side
tensor (see :mod:`infer.models.checkpoint` for the simple path and the shared checks)."""
from __future__ import annotations

import ctypes
import json
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import FiniteCheck, read_tensor, check_names, load_into, open_shard


@dataclass(frozen=True, slots=True)
class StagingConfig:
    """The staging ring of :func:`stream_weights`. Pinning costs ~0.5 ms per MiB on the H200 VM
    measured (more than reading it), and an 8B load ran as fast with 3 x 64 MiB as with
    4 x 256 MiB (~28 GB/s, read-bound)."""

    buffer_bytes: int = 64 << 20  # one staging buffer (bigger tensors go through in pieces)
    buffers: int = 3  # buffers in the ring: the reader fills one while copies drain the others
    read_threads: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))  # parallel preads per buffer
    min_read_bytes: int = 4 << 20  # smallest slice of a buffer that gets its own read thread

    def __post_init__(self) -> None:
        for name in ("buffer_bytes", "buffers", "read_threads", "min_read_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"StagingConfig.{name} must be a positive int, got {value!r}")


# safetensors dtype name -> torch dtype, for the types this torch has (others go through get_tensor)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
    }.items()
    if isinstance(getattr(torch, attr, None), torch.dtype)
}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header."""

    name: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


def read_header(file: Path) -> list[TensorEntry]:
    """The tensors of a safetensors file: 8 bytes little-endian header length, then JSON.

    The JSON maps each name to ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)``, counted
    from the end of the header; ``__metadata__`` is not a tensor.
    """
    with open(file, "rb") as f:
        size = f.read(8)
        if len(size) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its 8-byte header size)")
        length = int.from_bytes(size, "little")
        header = f.read(length)
        if len(header) != length:
            raise ValueError(f"{file} is not a safetensors file (header of {length} bytes is cut short)")
    base = 8 + length
    file_bytes = file.stat().st_size
    entries = []
    for name, info in json.loads(header).items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entry = TensorEntry(name, file, info["dtype"], tuple(info["shape"]), base + begin, end - begin)
        if not 0 <= begin <= end or base + end > file_bytes:
            raise ValueError(f"checkpoint tensor {name!r} in {file.name}: data_offsets {[begin, end]} lie outside "
                             f"the file's {file_bytes - base} data bytes (truncated file?)")
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is not None:
            numel = 1
            for d in entry.shape:
                numel *= d
            if numel * dtype.itemsize != entry.nbytes:
                raise ValueError(f"checkpoint tensor {name!r} in {file.name}: {entry.nbytes} bytes do not hold "
                                 f"{entry.dtype} {list(entry.shape)}")
        entries.append(entry)
    return entries


@dataclass(frozen=True, slots=True)
class _Piece:
    """Bytes ``[tensor_offset, tensor_offset + nbytes)`` of ``entry``, at ``buffer_offset`` in a buffer."""

    entry: TensorEntry
    tensor_offset: int
    buffer_offset: int
    nbytes: int
    last: bool  # the tensor's final piece: once copied, the tensor is complete


@dataclass(slots=True)
class _Chunk:
    """One read: ``nbytes`` contiguous bytes of ``file`` from ``offset`` into one staging buffer."""

    file: Path
    offset: int
    nbytes: int
    pieces: list[_Piece]


def _plan_chunks(entries: list[TensorEntry], staging_bytes: int) -> list[_Chunk]:
    """Pack consecutive tensors into reads of at most ``staging_bytes``; bigger tensors span several."""
    chunks: list[_Chunk] = []
    chunk: _Chunk | None = None
    for entry in entries:
        done = 0
        while done < entry.nbytes:
            at = entry.offset + done
            if chunk is None or chunk.file != entry.file or chunk.offset + chunk.nbytes != at \
                    or chunk.nbytes == staging_bytes:
                chunk = _Chunk(entry.file, at, 0, [])
                chunks.append(chunk)
            take = min(entry.nbytes - done, staging_bytes - chunk.nbytes)
            chunk.pieces.append(_Piece(entry, done, chunk.nbytes, take, done + take == entry.nbytes))
            chunk.nbytes += take
            done += take
    return chunks


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU uint8 tensor's memory (the tensor must outlive it)."""
    return memoryview((ctypes.c_ubyte * tensor.numel()).from_address(tensor.data_ptr())).cast("B")


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; raise if the file ends first."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # no preadv (Windows): one extra copy
            data = os.pread(fd, len(view) - done, offset + done)
            n = len(data)
            view[done : done + n] = data
        if n == 0:
            raise EOFError(f"file ended {len(view) - done} bytes short of a tensor's data (truncated checkpoint?)")
        done += n


class _Reader:
    """Background thread that reads each chunk into a free staging buffer, in order.

    ``free`` holds indices of buffers the reader may overwrite (the consumer puts one back only once
    the copies out of it have finished); ``filled`` receives ``(buffer index, chunk)`` per chunk, or
    the exception that stopped the reader. Each chunk is split over ``threads`` parallel preads.
    """

    def __init__(self, chunks: list[_Chunk], views: list[memoryview], threads: int, min_read_bytes: int) -> None:
        self.chunks = chunks
        self.views = views
        self.threads = max(1, threads)
        self.min_read_bytes = min_read_bytes
        self.free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.filled: queue.SimpleQueue[tuple[int, _Chunk] | BaseException] = queue.SimpleQueue()
        self.stopping = threading.Event()
        for index in range(len(views)):
            self.free.put(index)
        self.thread = threading.Thread(target=self._run, name="infer-weight-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="infer-weight-pread") as pool:
                for chunk in self.chunks:
                    index = self.free.get()
                    if index is None or self.stopping.is_set():
                        return
                    if chunk.file not in fds:
                        fds[chunk.file] = os.open(chunk.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    view = self.views[index][: chunk.nbytes]
                    self._read(pool, fds[chunk.file], view, chunk.offset)
                    self.filled.put((index, chunk))
        except BaseException as e:  # handed to the consumer, which raises it
            self.filled.put(e)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _read(self, pool: ThreadPoolExecutor, fd: int, view: memoryview, offset: int) -> None:
        parts = max(1, min(self.threads, len(view) // self.min_read_bytes))
        if parts == 1:
            _pread_exact(fd, view, offset)
            return
        step = -(-len(view) // parts)
        futures = [pool.submit(_pread_exact, fd, view[a : a + step], offset + a) for a in range(0, len(view), step)]
        for future in futures:
            future.result()

    def next(self) -> tuple[int, _Chunk]:
        """The next filled ``(buffer index, chunk)``; raises what stopped the reader."""
        item = self.filled.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Stop after the read in progress (if any) and wait for the thread."""
        self.stopping.set()
        self.free.put(None)
        self.thread.join()


def stream_weights(model: nn.Module, files: list[Path], staging: StagingConfig | None = None) -> int:
    """Load the checkpoint through a ring of staging buffers; returns the checkpoint bytes loaded.

    A reader thread fills ``staging.buffers`` buffers of ``staging.buffer_bytes`` (pinned when the
    parameters are on CUDA) with the raw tensor bytes; this thread copies each piece into a
    device-side tensor (asynchronously on CUDA, one CUDA event per buffer guards its reuse) and,
    once a tensor is complete, runs its parameter's weight_loader on it there. One
    synchronisation at the end. Tensors of dtypes missing from :data:`SAFETENSORS_DTYPES` go
    through ``get_tensor`` instead. ``staging``: default :class:`StagingConfig`.
    """
    staging = staging or StagingConfig()
    entries = [entry for file in files for entry in read_header(file)]
    check_names(model, {e.name for e in entries})
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = [e for e in entries if e.name in params]  # skipped buffers were vetted by check_names
    device = next(iter(params.values())).device if params else torch.device("cpu")
    loaded = sum(e.nbytes for e in wanted)

    finite = FiniteCheck()
    fallback = [e for e in wanted if e.dtype not in SAFETENSORS_DTYPES]
    for file in dict.fromkeys(e.file for e in fallback):
        with open_shard(file) as f:
            for e in (e for e in fallback if e.file == file):
                load_into(params, e.name, e.file, read_tensor(f, file, e.name).to(params[e.name].device), finite)
    raw = [e for e in wanted if e.dtype in SAFETENSORS_DTYPES]
    for e in (e for e in raw if e.nbytes == 0):  # nothing to read
        dtype = SAFETENSORS_DTYPES[e.dtype]
        load_into(params, e.name, e.file, torch.empty(e.shape, dtype=dtype, device=params[e.name].device))
    raw.sort(key=lambda e: (files.index(e.file), e.offset))  # file order: sequential reads
    chunks = _plan_chunks([e for e in raw if e.nbytes > 0], staging.buffer_bytes)
    if chunks:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            _stream_chunks(chunks, params, device, min(staging.buffers, len(chunks)), staging, finite)
    finite.raise_if_any()
    return loaded


def _stream_chunks(
    chunks: list[_Chunk], params: dict[str, nn.Parameter], device: torch.device, num_buffers: int,
    config: StagingConfig, finite: FiniteCheck,
) -> None:
    """The consumer side of :func:`stream_weights`: copy each filled buffer out, run the loaders."""
    cuda = device.type == "cuda"
    buffer_bytes = max(c.nbytes for c in chunks)
    staging = torch.empty(num_buffers, buffer_bytes, dtype=torch.uint8, pin_memory=cuda)  # [B, bytes]
    views = [_bytes_view(buffer) for buffer in staging]  # what the reader writes through
    stream = torch.cuda.current_stream(device) if cuda else None
    in_flight: deque[tuple[int, torch.cuda.Event]] = deque()  # buffers whose copies may still run
    partial: dict[TensorEntry, torch.Tensor] = {}  # device bytes of tensors still being filled
    reader = _Reader(chunks, views, config.read_threads, config.min_read_bytes)
    try:
        for _ in range(len(chunks)):
            while in_flight and in_flight[0][1].query():
                reader.free.put(in_flight.popleft()[0])
            if in_flight and reader.free.empty():  # the reader would wait on us: hand it a buffer
                index, event = in_flight.popleft()
                event.synchronize()
                reader.free.put(index)
            index, chunk = reader.next()
            buffer = staging[index]  # [buffer_bytes] uint8
            for piece in chunk.pieces:
                entry = piece.entry
                target = partial.get(entry)
                if target is None:
                    target = torch.empty(entry.nbytes, dtype=torch.uint8, device=params[entry.name].device)
                    partial[entry] = target
                source = buffer[piece.buffer_offset : piece.buffer_offset + piece.nbytes]
                target[piece.tensor_offset : piece.tensor_offset + piece.nbytes].copy_(source, non_blocking=cuda)
                if piece.last:
                    tensor = partial.pop(entry).view(SAFETENSORS_DTYPES[entry.dtype]).view(entry.shape)
                    load_into(params, entry.name, entry.file, tensor, finite)
            if cuda:
                event = torch.cuda.Event()
                event.record(stream)
                in_flight.append((index, event))
            else:  # the copies are done
                reader.free.put(index)
    finally:
        reader.stop()
        if cuda:
            stream.synchronize()  # every copy out of the staging buffers (and the loaders' copies) done
