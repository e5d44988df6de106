"""The merge's CPU engine for plain 16/32-bit merges, on NumPy: no torch, every core busy.

``run_merge`` hands a plan to this engine when the merge runs on the CPU and every tensor is
plain: a copy, a LoRA update in any layout (linear, Conv1D, embedding, conv), DoRA (with its
per-row norms), a lora bias, or a saved tensor replacing the base's — in float32, float16 or
bfloat16. 4-bit input or output (bitsandbytes), ``--method``, DoRA on GPT-2 Conv1D (norms down
columns) and float64 tensors go to the torch engine (``merge_torch``). Importing torch alone
takes about as long as copying a few GB through the page cache, and NumPy imports in a tenth
of a second, so the common merge never imports torch.

The math is the torch engine's: W' = W + Σᵢ cᵢ·Bᵢ·Aᵢ (DoRA: rescaled row by row; + lora
biases), in float32, rounded once into the output dtype (bfloat16 rounding to nearest even, as
torch rounds). The sum runs in the fused C kernel ``adapterctl._fused`` where the package was
built with it — base + L·R summed in registers and rounded in one pass over memory, about 3×
NumPy's speed — and in NumPy otherwise (``matmul``, the base widened and added, the rounding:
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.device import workers
from adapterctl.errors import UsageError
from adapterctl.files import POSITIONED_WRITES, pwrite_all
from adapterctl.floats import round_bf16, widen_bf16
from adapterctl.merge.plan import CHUNK_ELEMENTS, Delta, Job, MergePlan
from adapterctl.merge.writing import Overflow, copy_tensor_bytes, require_inside
from adapterctl.tensorfile import BYTES_READ, TensorInfo, header_bytes, numpy_dtype

if TYPE_CHECKING:
    import numpy as np

# "0": never use the compiled kernel (NumPy alone); "avx2", "generic"...: that vector width
# (one of the kernel's ISAS) instead of the widest the CPU runs.
FUSED_ENV = "ADAPTERCTL_FUSED"

KERNEL: Any = None  # the compiled kernel; None where not built, or turned off by FUSED_ENV
if os.environ.get(FUSED_ENV, "1") != "0":
    # Missing where no C compiler was found at install time: NumPy alone, same results, slower.
    with contextlib.suppress(ImportError):
        from adapterctl import _fused as KERNEL
    if KERNEL is not None and not hasattr(KERNEL, "addmm_round_into"):
        KERNEL = None  # left by an older version's build: NumPy until the install rebuilds it


def kernel_isa() -> str | None:
    """The compiled kernel's vector width for this run ("avx512", "avx2", "generic"), or None
    when the kernel is not used.

    Raises:
        UsageError: ``ADAPTERCTL_FUSED`` names a width this CPU (or build) lacks.
    """
    if KERNEL is None:
        return None
    wanted = os.environ.get(FUSED_ENV, "1")
    if wanted in ("", "1"):
        return str(KERNEL.ISAS[0])
    if wanted not in KERNEL.ISAS:
        raise UsageError(
            f"{FUSED_ENV}={wanted}: this CPU runs {', '.join(KERNEL.ISAS)}; set one of them, "
            "0 (no compiled kernel) or 1 (the widest)"
        )
    return wanted


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
) -> str:
    """Write every planned shard into the folder ``tmp``; returns the kernel that summed:
    ``fused-<width>`` (the compiled kernel, ``kernel_isa``) or ``numpy``.

    Args:
        plan: a plan ``supports`` accepts.
        tmp: the (empty) temporary output folder.
        progress: called with (bytes written so far, total bytes), from this thread.
        durable: fsync every shard before returning.
        overflow: counts values that became ±inf in float16 outputs.
    """
    from threadpoolctl import threadpool_limits

    isa = kernel_isa()
    used: set[str] = set()  # "fused" and/or "numpy": what summed the merged tensors
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
            _run_tasks(tasks, maps, overflow or Overflow(), isa, used, headers, total, progress)
        if durable:
            for fd in fds:
                os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
        maps.close()
    if isa is None or used == {"numpy"}:
        return "numpy"
    return f"fused-{isa}+numpy" if "numpy" in used else f"fused-{isa}"


def kernel_pays(isa: str, rank: int, cols: int) -> bool:
    """Whether the compiled kernel sums W + L·R faster than NumPy's ``sgemm`` here, as
    ``bench/kernel.py`` measured it (bench/RESULTS.md, "kernel"): the 4-float build only at
    the lowest ranks (it is 2–3× slower from rank 64); the 8/16-float builds everywhere but
    ranks around 128 on rows of up to 8192 values, where OpenBLAS was 1.2× faster.

    Args:
        isa: the kernel's vector width (``kernel_isa``).
        rank: the summed rank of the tensor's deltas (Σ rᵢ).
        cols: values per row of the stored weight.
    """
    if isa == "generic":
        return rank <= 16
    return not (96 < rank <= 192 and cols <= 8192)


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
    isa: str | None,
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
                fut = pool.submit(_write_job, job, fd, offset, maps, overflow, isa, used)
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
            mm = self._maps.get(info.path)
            if mm is None:
                with open(info.path, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[info.path] = mm
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
    isa: str | None,
    used: set[str],
) -> None:
    """Merge one tensor and write it at ``offset`` of ``fd`` (in a worker thread), with the
    compiled kernel's ``isa`` where it pays (None: NumPy alone); adds what summed to ``used``."""
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
    deltas = [_row_factors(d) for d in job.deltas]
    magnitude = None
    if job.dora is not None:
        deltas.append(_row_factors(job.dora))  # V = W + s·B·A, then rescaled row by row
        assert job.dora.module.magnitude is not None
        magnitude = job.dora.module.magnitude.array().astype(np.float32).reshape(-1, 1)
    biases = [
        (coeff * bias.array().astype(np.float64)).astype(np.float32).reshape(-1, 1)  # (rows, 1)
        for bias, coeff in job.bias_add
    ]
    # Σᵢ Lᵢ·Rᵢ as one product: the factors side by side, (rows, Σr) @ (Σr, cols).
    left = np.hstack([lf for lf, _ in deltas]) if deltas else np.empty((rows, 0), np.float32)
    right = np.vstack([rf for _, rf in deltas]) if deltas else np.empty((0, cols), np.float32)
    finish = magnitude is not None or bool(biases)  # float32 sums needed before rounding
    wanted = "F32" if finish else job.out_dtype
    pays = isa is not None and kernel_pays(isa, right.shape[0], cols)
    kernel_dtype = _kernel_dtype(base_dtype, wanted) if pays else None
    used.add("numpy" if kernel_dtype is None else "fused")
    if kernel_dtype is not None:
        right = _right_tiles(right)
    if kernel_dtype is not None and not finish:
        # The whole tensor in one call: the kernel merges it block by block of rows through
        # this worker's buffer and writes each block itself, with no Python in between.
        block = _BUFFERS.get("out", max(KERNEL_BLOCK_ELEMENTS, cols), numpy_dtype(job.out_dtype))
        inf = KERNEL.addmm_round_into(
            fd, offset, _raw(block), _raw(flat), left, right, rows, cols, right.shape[1],
            _KERNEL_CODES[base_dtype], _KERNEL_CODES[job.out_dtype], isa,
        )  # fmt: skip
        overflow.add(job.name, int(inf))
        return
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN round as torch rounds them
        for r0, r1 in row_chunks(rows, cols):
            w_rows, l_rows = flat[r0:r1], left[r0:r1]
            if kernel_dtype is not None:
                data, inf = _kernel_rows(w_rows, base_dtype, l_rows, right, kernel_dtype, isa)
                summed = kernel_dtype
            else:
                data, inf = _numpy_rows(w_rows, base_dtype, l_rows, right), 0
                summed = "F32"
            if finish or summed != job.out_dtype:
                data, inf = _finish_rows(data, r0, magnitude, biases, job.out_dtype)
            overflow.add(job.name, inf)
            offset += pwrite_all(fd, data.reshape(-1).view(np.uint8), offset)  # bf16: no buffers


def row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """The (first, end) rows of each chunk a worker merges: about ``CHUNK_ELEMENTS`` values,
    so that a chunk's float32 sums stay in cache; with the kernel, a multiple of its tile's
    rows where a chunk holds more than one tile."""
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    tile = KERNEL.TILE_ROWS if KERNEL is not None else 1
    if step > tile:
        step -= step % tile
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


# safetensors dtype name -> the kernel's number for it (bfloat16 and float16 as their bits)
_KERNEL_CODES = {"BF16": 0, "F16": 1, "F32": 2}


def _kernel_dtype(base: str, wanted: str) -> str | None:
    """``wanted`` when the compiled kernel can read ``base`` and write ``wanted`` (safetensors
    dtype names), else None."""
    names = {base, wanted}
    if KERNEL is None or not names <= _KERNEL_CODES.keys():
        return None
    return None if "F16" in names and not KERNEL.FLOAT16 else wanted


def _kernel_rows(
    w: np.ndarray[Any, Any],
    w_dtype: str,
    left: np.ndarray[Any, Any],
    right: np.ndarray[Any, Any],
    dtype: str,
    isa: str | None = None,
) -> tuple[np.ndarray[Any, Any], int]:
    """W + L·R for the rows ``w`` (rows, cols), of safetensors dtype ``w_dtype`` held as
    ``numpy_dtype`` holds it, with the compiled kernel's ``isa`` (None: the widest; ``right``
    in tiles: ``_right_tiles``), rounded once into ``dtype`` (a safetensors name), in this
    worker's buffer; and how many finite sums overflowed float16."""
    rows, cols = w.shape
    key = "work" if dtype == "F32" else "out"  # float32 sums go on to _finish_rows
    data = _BUFFERS.get(key, rows * cols, numpy_dtype(dtype)).reshape(rows, cols)
    inf = KERNEL.addmm_round(
        _raw(data),
        _raw(w),
        left,  # (rows, r) float32
        right,  # (ceil(cols / T), r, T) float32: _right_tiles
        rows,
        cols,
        right.shape[1],
        _KERNEL_CODES[w_dtype],
        _KERNEL_CODES[dtype],
        isa,
    )
    return data, int(inf)


def _raw(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``a`` as the kernel takes it: bfloat16/float16 as their 16 bits, float32 as it is."""
    import numpy as np

    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.float32)


def _right_tiles(right: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``right`` (r, cols) in the kernel's layout: tiles of T columns, (ceil(cols / T), r, T),
    zero-padded, so that the r·T values a tile of the output needs are contiguous."""
    import numpy as np

    rank, cols = right.shape
    tile = KERNEL.TILE_COLS
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


def _finish_rows(
    chunk: np.ndarray[Any, Any],
    r0: int,
    magnitude: np.ndarray[Any, Any] | None,
    biases: list[np.ndarray[Any, Any]],
    out_dtype: str,
) -> tuple[np.ndarray[Any, Any], int]:
    """Finish float32 rows r0… of W + ΔW (in place): DoRA's m/‖V‖_row when ``magnitude``
    (rows, 1) is given, the lora biases, then the one rounding into ``out_dtype`` (a
    safetensors name). Returns the rounded rows (in this worker's buffer; bfloat16 as its
    bits) and how many finite values became ±inf in float16."""
    import numpy as np

    rows, cols = chunk.shape
    r1 = r0 + rows
    if magnitude is not None:  # DoRA: W' = m / ‖V‖_row · V, the norm per output row
        chunk *= magnitude[r0:r1] / np.linalg.norm(chunk, axis=1, keepdims=True)
    for bias in biases:
        chunk += bias[r0:r1]
    if out_dtype == "F32":
        return chunk, 0
    # The one rounding, to nearest even as torch rounds: float32 -> output dtype.
    data = _BUFFERS.get("out", rows * cols, numpy_dtype(out_dtype)).reshape(rows, cols)
    if out_dtype == "BF16":
        return round_bf16(chunk, out=data), 0
    np.copyto(data, chunk, casting="unsafe")  # float16: NumPy's cast rounds as torch does
    inf = 0
    if np.isinf(data).any():
        inf = int(np.count_nonzero(np.isinf(data) & np.isfinite(chunk)))
    return data, inf


def _row_factors(d: Delta) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(L, R) in float32 with rows r0:r1 of wᵢ·sᵢ·ΔWᵢ, in the weight's stored layout, equal to
    L[r0:r1] @ R: (c·B, A) for (out, in) weights; (Aᵀ, c·Bᵀ) for weights stored (in, out)
    (GPT-2 Conv1D, embeddings)."""
    import numpy as np

    b, a = d.module.arrays("float64")  # (out, r), (r, in)
    cb = (d.weight * d.module.scale) * b  # the coefficient applied in float64, rounded once
    if d.layout in ("conv1d", "embedding"):
        return (
            np.ascontiguousarray(a.T, dtype=np.float32),  # (in, r)
            np.ascontiguousarray(cb.T, dtype=np.float32),  # (r, out)
        )
    return cb.astype(np.float32), a.astype(np.float32)  # (out, r), (r, in)
