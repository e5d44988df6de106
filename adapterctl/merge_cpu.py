"""The merge's CPU engine for plain 16/32-bit merges, on NumPy: no torch, every core busy.

``run_merge`` hands a plan to this engine when the merge runs on the CPU and every tensor is
plain: a copy, a LoRA update in any layout (linear, Conv1D, embedding, conv), DoRA (with its
per-row norms), a lora bias, or a saved tensor replacing the base's — in float32, float16 or
bfloat16. 4-bit input or output (bitsandbytes), ``--method``, DoRA on GPT-2 Conv1D (norms down
columns) and float64 tensors go to the torch engine (``merge_torch``). Importing torch alone
takes about as long as copying a few GB through the page cache, and NumPy imports in a tenth
of a second, so the common merge never imports torch.

The math is the torch engine's: W' = W + Σᵢ cᵢ·Bᵢ·Aᵢ (DoRA: rescaled row by row; + lora
biases), in float32, rounded once into the output dtype (bfloat16 rounding, to nearest even,
by ml_dtypes). Work is split by tensor across worker threads (NumPy and the kernel release the
GIL): each takes the next job, merges its rows in float32 chunks that stay in cache, rounds
each chunk and writes it at its planned offset with ``pwrite`` — every header is planned, so
each tensor's place in its file is known and the workers never wait for each other. Base
tensors are read through memory maps (page cache, not anonymous memory); untouched tensors
are copied in the kernel.
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

from adapterctl.files import POSITIONED_WRITES, pwrite_all
from adapterctl.merge import (
    CHUNK_ELEMENTS,
    PAUSE_ENV,
    Delta,
    Job,
    MergePlan,
    Overflow,
    copy_tensor_bytes,
    pause_for_tests,
    require_inside,
)
from adapterctl.tensorfile import BYTES_READ, TensorInfo, header_bytes, numpy_dtype

if TYPE_CHECKING:
    import numpy as np

ENGINE_DTYPES = frozenset({"F32", "F16", "BF16"})
MAX_WORKERS = 8
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


def workers() -> int:
    """Worker threads: one per usable core (CPU affinity, and a container's CPU quota where
    cgroup v2 sets one), at most ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores, _cgroup_cpu_quota() or cores))


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs a cgroup v2 quota allows (``docker --cpus 2``: "200000 100000" → 2), or None."""
    try:
        with open(path) as fh:
            quota, period = fh.read().split()[:2]
        return max(1, int(quota) // int(period))
    except (OSError, ValueError):  # no cgroup v2 file, or "max" (no quota)
        return None


def write_shards(
    plan: MergePlan,
    tmp: Path,
    progress: Callable[[int, int], None] | None = None,
    durable: bool = False,
    overflow: Overflow | None = None,
) -> None:
    """Write every planned shard into the folder ``tmp``.

    Args:
        plan: a plan ``supports`` accepts.
        tmp: the (empty) temporary output folder.
        progress: called with (bytes written so far, total bytes), from this thread.
        durable: fsync every shard before returning.
        overflow: counts values that became ±inf in float16 outputs.
    """
    from threadpoolctl import threadpool_limits

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
        tasks.sort(key=lambda t: -t[0].nbytes_out)  # largest first: the workers finish together
        # One BLAS thread per worker: the workers already fill the cores.
        with threadpool_limits(limits=1, user_api="blas"):
            total = headers + plan.bytes_out
            _run_tasks(tasks, maps, overflow or Overflow(), tmp, headers, total, progress)
        if durable:
            for fd in fds:
                os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
        maps.close()


def _run_tasks(
    tasks: list[tuple[Job, int, int]],
    maps: _BaseMaps,
    overflow: Overflow,
    tmp: Path,
    done: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Hand the jobs to the workers in order, a few ahead, reporting progress as they finish;
    the first failure stops the rest (queued jobs are cancelled)."""
    n_workers = workers()
    pause_at = int(os.environ.get(PAUSE_ENV, "-1"))
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
            for counter, (job, fd, offset) in enumerate(tasks):
                if counter == pause_at:
                    settle(0)
                    pause_for_tests(tmp)
                settle(2 * n_workers)
                fut = pool.submit(_write_job, job, fd, offset, maps, overflow)
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


def _write_job(job: Job, fd: int, offset: int, maps: _BaseMaps, overflow: Overflow) -> None:
    """Merge one tensor and write it at ``offset`` of ``fd`` (in a worker thread)."""
    import numpy as np

    if job.copy_bytes:
        assert job.source is not None
        copy_tensor_bytes(job.source, fd, offset)
        return
    source = job.replace if job.replace is not None else job.source
    assert source is not None
    # Mapped, not read, when the tensor is in a safetensors file (a saved 128k-row embedding
    # would otherwise cost a GB of memory); a legacy .bin adapter's tensors are in memory.
    w = maps.view(source) if isinstance(source, TensorInfo) else source.array()
    rows = w.shape[0] if w.ndim else 1  # a scalar is one row of one
    flat = w.reshape(rows, -1)  # conv kernels flattened: (out, in·k); a bias is (out, 1)
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
    out_dtype = numpy_dtype(job.out_dtype)
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN round as torch rounds them
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            data, chunk = _merged_rows(flat[r0:r1], r0, deltas, magnitude, biases, out_dtype)
            if data.dtype == np.float16 and np.isinf(data).any():
                overflow.add(job.name, int(np.count_nonzero(np.isinf(data) & np.isfinite(chunk))))
            offset += pwrite_all(fd, data.reshape(-1).view(np.uint8), offset)  # bf16: no buffers


def _merged_rows(
    w: np.ndarray[Any, Any],
    r0: int,
    deltas: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]],
    magnitude: np.ndarray[Any, Any] | None,
    biases: list[np.ndarray[Any, Any]],
    out_dtype: np.dtype[Any],
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Merge the base rows ``w`` (rows r0…, flattened): W + Σ c·B·A, DoRA's m/‖V‖_row when
    ``magnitude`` (rows, 1) is given, lora biases. Returns (the rows rounded into
    ``out_dtype``, the float32 rows they were rounded from), in this worker's buffers."""
    import numpy as np

    rows, cols = w.shape
    r1, n = r0 + rows, rows * cols
    chunk = _BUFFERS.get("work", n, np.float32).reshape(rows, cols)  # float32 W' rows
    if deltas:
        left, right = deltas[0]
        np.matmul(left[r0:r1], right, out=chunk)  # (rows, r) @ (r, cols): c·ΔW rows
        for left, right in deltas[1:]:
            more = _BUFFERS.get("more", n, np.float32).reshape(rows, cols)
            np.matmul(left[r0:r1], right, out=more)
            chunk += more
        np.add(chunk, w, out=chunk, casting="unsafe")  # + W, widened exactly
    else:
        np.copyto(chunk, w, casting="unsafe")
    if magnitude is not None:  # DoRA: W' = m / ‖V‖_row · V, the norm per output row
        chunk *= magnitude[r0:r1] / np.linalg.norm(chunk, axis=1, keepdims=True)
    for bias in biases:
        chunk += bias[r0:r1]
    if out_dtype == chunk.dtype:
        return chunk, chunk
    data = _BUFFERS.get("out", n, out_dtype).reshape(rows, cols)
    np.copyto(data, chunk, casting="unsafe")  # the one rounding: float32 -> output dtype
    return data, chunk


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
