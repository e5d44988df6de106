"""The merge's CPU engine for plain 16/32-bit merges, on NumPy: no torch, every core busy.

``run_merge`` hands a plan to this engine when the merge runs on the CPU and every tensor is
plain: a copy, a LoRA update in any layout (linear, Conv1D, embedding, conv), DoRA (with its
per-row norms), a lora bias, or a saved tensor replacing the base's — in float32, float16 or
bfloat16. 4-bit input or output (bitsandbytes), ``--method``, DoRA on GPT-2 Conv1D (norms down
columns) and float64 tensors go to the torch engine (``torch_engine``). Importing torch alone
takes about as long as copying a few GB through the page cache, and NumPy imports in a tenth
of a second, so the common merge never imports torch.

The math is ``adapterctl.merge.math``'s, as in the torch engine: W' = W + L·R (every delta's
factors side by side; DoRA: rescaled row by row; + lora biases), in float32, rounded once into
the output dtype (bfloat16 rounding to nearest even, as torch rounds). The sum runs in a
compiled kernel where a plugin provides one (``choose_kernel``; the first-party
``adapterctl-fused``) and it was measured faster for the tensor's rank and row length — base
+ L·R summed in registers and rounded in one pass over memory, about 3× NumPy's speed — and
in NumPy otherwise (``matmul``, the base widened and added, the rounding:
several passes; bfloat16, which NumPy lacks, held as its bits and converted by
``adapterctl.floats``). Work is split by tensor across worker threads (NumPy and the kernel
release the GIL): each takes the next job, merges its rows in float32 chunks that stay in
cache, rounds each chunk and writes it at its planned offset with ``pwrite`` (with the
kernel, one call per tensor does all of this, block by block of rows, in C) — every header
is planned, so each tensor's place in its file is known and the workers never wait for each
other. Base tensors are read through memory maps (page cache, not anonymous memory);
untouched tensors are copied in the kernel.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.device import workers
from adapterctl.errors import UsageError
from adapterctl.files import POSITIONED_WRITES, pwrite_all
from adapterctl.floats import round_bf16, widen_bf16
from adapterctl.merge import math
from adapterctl.merge.plan import CHUNK_ELEMENTS, Job, MergePlan
from adapterctl.merge.writing import Overflow, copy_tensor_bytes, require_inside
from adapterctl.tensorfile import BYTES_READ, TensorInfo, header_bytes, numpy_dtype

if TYPE_CHECKING:
    import numpy as np

# The default of ``choose_kernel``: "0" (NumPy alone), "1" or unset (the widest vector width
# of the first kernel that loads), or a width ("avx2", "generic"...) of it.
FUSED_ENV = "ADAPTERCTL_FUSED"


@dataclass(frozen=True)
class Kernel:
    """A compiled merge kernel, registered by a plugin (hook ``register_merge_kernels``; the
    first-party one is ``adapterctl-fused``), at the vector width this run uses."""

    plugin: Any  # the registered object: name, description, load(), pays(isa, rank, cols)
    module: Any  # its compiled module: ISAS, TILE_ROWS, TILE_COLS, FLOAT16, addmm_round(_into)
    isa: str

    @property
    def label(self) -> str:
        """How the merge report names it: ``fused-avx512``."""
        return f"{self.plugin.name}-{self.isa}"

    def pays(self, rank: int, cols: int) -> bool:
        """Whether it beats NumPy on a tensor of summed rank ``rank`` and ``cols`` per row
        (as the plugin measured it)."""
        return bool(self.plugin.pays(self.isa, rank, cols))


def available_kernels() -> list[tuple[Any, Any]]:
    """(plugin object, compiled module or None) of every registered merge kernel, in order."""
    from adapterctl.plugins import collect

    return [(k, k.load()) for k in collect("register_merge_kernels")]


def choose_kernel(wanted: str | None = None) -> Kernel | None:
    """The compiled kernel a merge uses, or None for NumPy alone.

    Args:
        wanted: ``none`` (or ``0``): NumPy alone; ``auto`` (or ``1``): the first registered
            kernel that loads, at the widest vector width this CPU runs (NumPy alone where
            none is installed or built); a width (``avx512``, ``avx2``, ``generic``): that
            width of it. Default: ``ADAPTERCTL_FUSED``, else ``auto``.

    Raises:
        UsageError: a width this CPU or build lacks, or no kernel installed to run it.
    """
    if wanted is None:
        wanted = os.environ.get(FUSED_ENV, "") or "auto"
    if wanted in ("none", "0"):
        return None
    found = next(((k, m) for k, m in available_kernels() if m is not None), None)
    if wanted in ("auto", "1"):
        return None if found is None else Kernel(found[0], found[1], str(found[1].ISAS[0]))
    if found is None or wanted not in found[1].ISAS:
        runs = (
            ", ".join(found[1].ISAS)
            if found
            else "no compiled kernel (pip install adapterctl-fused)"
        )
        raise UsageError(
            f"{FUSED_ENV}={wanted}: this CPU runs {runs}; set one of them, "
            "0 (no compiled kernel) or 1 (the widest)"
        )
    return Kernel(found[0], found[1], wanted)


# Values per block of rows the compiled kernel merges and writes at once: its output (128 KiB
# in bf16) stays in L2 beside the factor it reads (up to 1 MiB); larger blocks measured slower.
KERNEL_BLOCK_ELEMENTS = 1 << 16
ENGINE_DTYPES = frozenset({"F32", "F16", "BF16"})
# Linux ≥ 5.14 (Python names it from 3.12 on); elsewhere pages fault in as they are read.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def supports(plan: MergePlan) -> bool:
    """True when every job of ``plan`` is one this engine runs (see the module docstring) and
    the system has positioned writes (the workers write one file at once)."""
    return POSITIONED_WRITES and all(_plain(job) for job in plan.jobs)


def _plain(job: Job) -> bool:
    if job.copy_bytes:
        return True
    if job.quant_in or job.quantize or job.combine or job.transpose_out:
        return False
    if job.dora is not None and job.dora.layout == "conv1d":
        return False  # its norms run down the columns of the stored (in, out) weight
    source = job.replace if job.replace is not None else job.source
    return source is not None and {source.dtype, job.out_dtype} <= ENGINE_DTYPES


def write_shards(
    plan: MergePlan,
    tmp: Path,
    progress: Callable[[int, int], None] | None = None,
    durable: bool = False,
    overflow: Overflow | None = None,
    kernel: Kernel | None = None,
) -> str:
    """Write every planned shard into the folder ``tmp``; returns what summed: the compiled
    kernel (``fused-<width>``), ``numpy``, or both (``fused-<width>+numpy``).

    Args:
        plan: a plan ``supports`` accepts.
        tmp: the (empty) temporary output folder.
        progress: called with (bytes written so far, total bytes), from this thread.
        durable: fsync every shard before returning.
        overflow: counts values that became ±inf in float16 outputs.
        kernel: the compiled kernel to call where it pays (``choose_kernel``); None: NumPy.
    """
    from threadpoolctl import threadpool_limits

    used: set[str] = set()  # "kernel" and/or "numpy": what summed the merged tensors
    fds: list[int] = []
    tasks: list[tuple[Job, int, int]] = []  # (job, output file, offset of its bytes there)
    headers = 0
    maps = _BaseMaps()
    try:
        for shard in plan.shards:
            fd = os.open(tmp / shard.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            offset = pwrite_all(fd, header_bytes(shard.entries(), plan.header_metadata), 0)
            headers += offset
            for job in shard.jobs:
                tasks.append((job, fd, offset))
                offset += job.nbytes_out
        tasks = _schedule(tasks)
        # One BLAS thread per worker: the workers already fill the cores.
        with threadpool_limits(limits=1, user_api="blas"):
            total = headers + plan.bytes_out
            _run_tasks(tasks, maps, overflow or Overflow(), kernel, used, headers, total, progress)
        if durable:
            for fd in fds:
                os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
        maps.close()
    if kernel is None or "kernel" not in used:
        return "numpy"
    return f"{kernel.label}+numpy" if "numpy" in used else kernel.label


def _schedule(tasks: list[tuple[Job, int, int]]) -> list[tuple[Job, int, int]]:
    """The order the workers take the jobs in: largest first (the workers finish together),
    alternating between output files, so that workers at work at once mostly write different
    files (writes to one file take its inode lock in turn: two writers spin on it)."""
    by_file: dict[int, list[tuple[Job, int, int]]] = {}
    for task in sorted(tasks, key=lambda t: -t[0].nbytes_out):
        by_file.setdefault(task[1], []).append(task)
    # Each job's rank within its file, then its size: the files' largest jobs interleave.
    ranked = [(rank, t) for queue in by_file.values() for rank, t in enumerate(queue)]
    ranked.sort(key=lambda rt: (rt[0], -rt[1][0].nbytes_out))
    return [t for _, t in ranked]


def _run_tasks(
    tasks: list[tuple[Job, int, int]],
    maps: _BaseMaps,
    overflow: Overflow,
    kernel: Kernel | None,
    used: set[str],
    done: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Hand the jobs to the workers in order, a few ahead, reporting progress as they finish;
    the first failure stops the rest (queued jobs are cancelled)."""
    n_workers = workers()
    pending: deque[tuple[Future[None], int]] = deque()
    with ThreadPoolExecutor(n_workers, thread_name_prefix="adapterctl-merge") as pool:

        def settle(keep: int) -> None:
            nonlocal done
            while len(pending) > keep:
                fut, nbytes = pending.popleft()
                fut.result()
                done += nbytes
                if progress is not None:
                    progress(done, total)

        try:
            for job, fd, offset in tasks:
                settle(2 * n_workers)
                fut = pool.submit(_write_job, job, fd, offset, maps, overflow, kernel, used)
                pending.append((fut, job.nbytes_out))
            settle(0)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


class _BaseMaps:
    """Read-only memory maps of the base's shard files, opened once and shared by the workers."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def view(self, info: TensorInfo) -> np.ndarray[Any, Any]:
        """The tensor as an array over the page cache (no copy), its pages mapped in now.

        The shard's size was checked against its header when it was opened; a file truncated
        while the merge runs is outside what this guards against.
        """
        import numpy as np

        with self._lock:
            path = info.local_path
            mm = self._maps.get(path)
            if mm is None:
                with open(path, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[path] = mm
            BYTES_READ.add(info.nbytes)
        require_inside(info, len(mm))
        page = info.start - info.start % mmap.PAGESIZE
        if info.nbytes and _MADV_POPULATE_READ is not None:
            # Map every page in one call instead of one fault per page; older kernels refuse.
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(_MADV_POPULATE_READ, page, info.end - page)
        dtype = numpy_dtype(info.dtype)
        return np.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start).reshape(
            info.shape
        )

    def close(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still alive (a traceback): GC closes it
                mm.close()
        self._maps.clear()


class _Buffers(threading.local):
    """Each worker's reused chunk buffers (allocated once, grown when a row is wider)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray[Any, Any]] = {}

    def get(self, key: str, n: int, dtype: Any) -> np.ndarray[Any, Any]:
        import numpy as np

        buf = self.arrays.get(key)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = np.empty(max(n, CHUNK_ELEMENTS), dtype=dtype)
            self.arrays[key] = buf
        return buf[:n]


_BUFFERS = _Buffers()


def _write_job(
    job: Job,
    fd: int,
    offset: int,
    maps: _BaseMaps,
    overflow: Overflow,
    kernel: Kernel | None,
    used: set[str],
) -> None:
    """Merge one tensor and write it at ``offset`` of ``fd`` (in a worker thread), with the
    compiled ``kernel`` where it pays (None: NumPy alone); adds what summed to ``used``."""
    import numpy as np

    if job.copy_bytes:
        assert job.source is not None
        copy_tensor_bytes(job.source, fd, offset)
        return
    source = job.replace if job.replace is not None else job.source
    assert source is not None
    # Mapped, not read, when the tensor is in a safetensors file (a saved 128k-row embedding
    # would otherwise cost a GB of memory); a legacy .bin adapter's tensors are in memory.
    if isinstance(source, TensorInfo):
        w, base_dtype = maps.view(source), source.dtype  # as stored: bfloat16 as its bits
    else:
        w = source.array()  # bfloat16 comes widened to float32
        base_dtype = "F16" if w.dtype == np.float16 else "F32"
    rows = w.shape[0] if w.ndim else 1  # a scalar is one row of one
    flat = np.ascontiguousarray(w.reshape(rows, -1))  # conv kernels: (out, in·k); bias: (out, 1)
    cols = flat.shape[1]
    upd = math.update(job, rows, cols)  # left (rows, Σr), right (Σr, cols), float32
    wanted = "F32" if upd.finishes else job.out_dtype  # float32 sums needed before finishing
    pays = kernel is not None and kernel.pays(upd.rank, cols)
    kernel_dtype = _kernel_dtype(base_dtype, wanted, kernel) if pays else None
    used.add("numpy" if kernel_dtype is None else "kernel")
    left, right = upd.left, upd.right
    if kernel is not None and kernel_dtype is not None:
        right = _right_tiles(right, kernel)
        if not upd.finishes:
            # The whole tensor in one call: the kernel merges it block by block of rows
            # through this worker's buffer and writes each block itself, no Python between.
            out = numpy_dtype(job.out_dtype)
            block = _BUFFERS.get("out", max(KERNEL_BLOCK_ELEMENTS, cols), out)
            inf = kernel.module.addmm_round_into(
                fd, offset, _raw(block), _raw(flat), left, right, rows, cols, right.shape[1],
                _KERNEL_CODES[base_dtype], _KERNEL_CODES[job.out_dtype], kernel.isa,
            )  # fmt: skip
            overflow.add(job.name, int(inf))
            return
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN round as torch rounds them
        for r0, r1 in row_chunks(rows, cols, kernel):
            w_rows, l_rows = flat[r0:r1], left[r0:r1]
            if kernel is not None and kernel_dtype is not None:
                data, inf = _kernel_rows(w_rows, base_dtype, l_rows, right, kernel_dtype, kernel)
                summed = kernel_dtype
            else:
                data, inf = _numpy_rows(w_rows, base_dtype, l_rows, right), 0
                summed = "F32"
            if upd.finishes or summed != job.out_dtype:
                math.finish(data, upd, slice(r0, r1))
                data, inf = _round_rows(data, job.out_dtype)
            overflow.add(job.name, inf)
            offset += pwrite_all(fd, data.reshape(-1).view(np.uint8), offset)  # bf16: no buffers


def row_chunks(rows: int, cols: int, kernel: Kernel | None = None) -> list[tuple[int, int]]:
    """The (first, end) rows of each chunk a worker merges: about ``CHUNK_ELEMENTS`` values,
    so that a chunk's float32 sums stay in cache; with a ``kernel``, a multiple of its tile's
    rows where a chunk holds more than one tile."""
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    tile = kernel.module.TILE_ROWS if kernel is not None else 1
    if step > tile:
        step -= step % tile
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


# safetensors dtype name -> the kernel's number for it (bfloat16 and float16 as their bits)
_KERNEL_CODES = {"BF16": 0, "F16": 1, "F32": 2}


def _kernel_dtype(base: str, wanted: str, kernel: Kernel | None) -> str | None:
    """``wanted`` when ``kernel`` can read ``base`` and write ``wanted`` (safetensors dtype
    names), else None."""
    names = {base, wanted}
    if kernel is None or not names <= _KERNEL_CODES.keys():
        return None
    return None if "F16" in names and not kernel.module.FLOAT16 else wanted


def _kernel_rows(
    w: np.ndarray[Any, Any],
    w_dtype: str,
    left: np.ndarray[Any, Any],
    right: np.ndarray[Any, Any],
    dtype: str,
    kernel: Kernel,
) -> tuple[np.ndarray[Any, Any], int]:
    """W + L·R for the rows ``w`` (rows, cols), of safetensors dtype ``w_dtype`` held as
    ``numpy_dtype`` holds it, with the compiled ``kernel`` (``right`` in its tiles:
    ``_right_tiles``), rounded once into ``dtype`` (a safetensors name), in this worker's
    buffer; and how many finite sums overflowed float16."""
    rows, cols = w.shape
    key = "work" if dtype == "F32" else "out"  # float32 sums go on to _finish_rows
    data = _BUFFERS.get(key, rows * cols, numpy_dtype(dtype)).reshape(rows, cols)
    inf = kernel.module.addmm_round(
        _raw(data),
        _raw(w),
        left,  # (rows, r) float32
        right,  # (ceil(cols / T), r, T) float32: _right_tiles
        rows,
        cols,
        right.shape[1],
        _KERNEL_CODES[w_dtype],
        _KERNEL_CODES[dtype],
        kernel.isa,
    )
    return data, int(inf)


def _raw(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``a`` as the kernel takes it: bfloat16/float16 as their 16 bits, float32 as it is."""
    import numpy as np

    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.float32)


def _right_tiles(right: np.ndarray[Any, Any], kernel: Kernel) -> np.ndarray[Any, Any]:
    """``right`` (r, cols) in the kernel's layout: tiles of T columns, (ceil(cols / T), r, T),
    zero-padded, so that the r·T values a tile of the output needs are contiguous."""
    import numpy as np

    rank, cols = right.shape
    tile = kernel.module.TILE_COLS
    n = -(-cols // tile)
    padded = np.zeros((rank, n * tile), np.float32)
    padded[:, :cols] = right
    return np.ascontiguousarray(padded.reshape(rank, n, tile).transpose(1, 0, 2))


def _numpy_rows(
    w: np.ndarray[Any, Any],
    w_dtype: str,
    left: np.ndarray[Any, Any],
    right: np.ndarray[Any, Any],
) -> np.ndarray[Any, Any]:
    """W + L·R for the rows ``w`` (rows, cols), of safetensors dtype ``w_dtype`` held as
    ``numpy_dtype`` holds it, in float32 with NumPy (matmul, then the base widened exactly),
    in this worker's buffer."""
    import numpy as np

    rows, cols = w.shape
    chunk = _BUFFERS.get("work", rows * cols, np.float32).reshape(rows, cols)
    if not right.shape[0]:
        if w_dtype == "BF16":
            return widen_bf16(w, out=chunk)
        np.copyto(chunk, w, casting="safe")  # float16 widens exactly
        return chunk
    np.matmul(left, right, out=chunk)  # (rows, r) @ (r, cols)
    if w_dtype == "BF16":
        w = widen_bf16(w, out=_BUFFERS.get("base", rows * cols, np.float32).reshape(rows, cols))
    np.add(chunk, w, out=chunk)
    return chunk


def _round_rows(chunk: np.ndarray[Any, Any], out_dtype: str) -> tuple[np.ndarray[Any, Any], int]:
    """The one rounding of finished float32 rows (rows, cols) into ``out_dtype`` (a safetensors
    name), to nearest even as torch rounds. Returns the rounded rows (in this worker's buffer;
    bfloat16 as its bits) and how many finite values became ±inf in float16."""
    import numpy as np

    if out_dtype == "F32":
        return chunk, 0
    rows, cols = chunk.shape
    data = _BUFFERS.get("out", rows * cols, numpy_dtype(out_dtype)).reshape(rows, cols)
    if out_dtype == "BF16":
        return round_bf16(chunk, out=data), 0
    np.copyto(data, chunk, casting="unsafe")  # float16: NumPy's cast rounds as torch does
    inf = 0
    if np.isinf(data).any():
        inf = int(np.count_nonzero(np.isinf(data) & np.isfinite(chunk)))
    return data, inf
