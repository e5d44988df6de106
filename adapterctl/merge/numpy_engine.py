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
other. Base tensors are read with positioned reads, a few MiB of rows at a time, into each
worker's buffers (``_BaseFiles``: a base that shrinks mid-merge is an error, not a SIGBUS;
the kernel reads guarded memory maps); untouched tensors are copied in the kernel. Every
plain value is the correctly rounded exact sum (``adapterctl.merge.rounding``): 16-bit
outputs up to summed rank ``FLOAT32_RANK`` sum in float32 and prove each value by an error
bound (the kernel in registers, NumPy by ``rounding.float32_unproven``), the unproven summed
again in float64 or settled; the others sum in float64, the rare undecided values settled.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.device import workers
from adapterctl.errors import UsageError
from adapterctl.files import POSITIONED_WRITES, pwrite_all
from adapterctl.floats import round_bf16, widen, widen_bf16
from adapterctl.merge import math, rounding
from adapterctl.merge.plan import CHUNK_ELEMENTS, Job, MergePlan
from adapterctl.merge.writing import Overflow, copy_tensor_bytes, shrank
from adapterctl.tensorfile import BYTES_READ, DTYPE_SIZES, TensorInfo, header_bytes, numpy_dtype

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
            none is installed or built); a width (``avx512bf16``, ``avx512``, ``avx2``,
            ``generic``): that width of it. Default: ``ADAPTERCTL_FUSED``, else ``auto``.

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
    maps = _BaseFiles()
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
    maps: _BaseFiles,
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


class _BaseFiles:
    """The base's shard files, opened once and shared by the workers, read with positioned
    reads into each worker's buffers.

    NumPy reads with checked positioned reads: a base file that shrinks while the merge runs
    (another process rewriting it) gives a short read and a one-line error (exit 1), where a
    mapped page past the new end would kill the process with SIGBUS. The compiled kernel
    reads memory maps (``mapped``: no copy) because it guards its reads: SIGBUS there becomes
    BufferError, and the same error.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, Any] = {}  # mmap.mmap per file, for the compiled kernel
        self._lock = threading.Lock()

    def read_rows(self, info: TensorInfo, cols: int, r0: int, r1: int) -> np.ndarray[Any, Any]:
        """Rows r0:r1 of the tensor flattened to (rows, cols), as stored (bfloat16 as its
        bits), in this worker's buffer.

        Raises:
            OperationalError: the file ended before the rows (it shrank since it was opened).
        """
        import numpy as np

        fd = self._fd(info.local_path)
        dtype = numpy_dtype(info.dtype)
        rows = _BUFFERS.get("base_rows", (r1 - r0) * cols, dtype).reshape(r1 - r0, cols)
        view = memoryview(rows.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        at = info.start + r0 * cols * dtype.itemsize
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], at + got)
            if n == 0:
                shrank(info)
            got += n
        BYTES_READ.add(got)
        return rows

    def mapped(self, info: TensorInfo, cols: int) -> np.ndarray[Any, Any] | None:
        """The tensor flattened to (rows, cols), as stored, over a read-only memory map of its
        file (no copy), its pages mapped in now; None where the file cannot be mapped.

        Only for the compiled kernel, which guards its reads: a page past the end of a file
        that shrank after this raises SIGBUS, which the kernel turns into BufferError (an
        access from Python or NumPy would kill the process).

        Raises:
            OperationalError: the file already ends before the tensor.
        """
        import numpy as np

        path = info.local_path
        with self._lock:
            mm = self._maps.get(path)
            if mm is None:
                try:
                    with open(path, "rb") as fh:
                        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):
                    return None
                self._maps[path] = mm
        if len(mm) < info.end:
            shrank(info)
        if info.nbytes and _MADV_POPULATE_READ is not None:
            # Map every page in one call instead of one fault per page; older kernels refuse.
            page = info.start - info.start % mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(_MADV_POPULATE_READ, page, info.end - page)
        BYTES_READ.add(info.nbytes)
        dtype = numpy_dtype(info.dtype)
        return np.frombuffer(mm, dtype, count=info.numel, offset=info.start).reshape(-1, cols)

    def read_values(self, info: TensorInfo, flat: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The tensor's values at the flat indices ``flat``, as stored, by positioned reads.

        Raises:
            OperationalError: the file ended before one of them.
        """
        import numpy as np

        dtype = numpy_dtype(info.dtype)
        fd = self._fd(info.local_path)
        out = np.empty(len(flat), dtype)
        for n, i in enumerate(flat.tolist()):
            raw = os.pread(fd, dtype.itemsize, info.start + i * dtype.itemsize)
            if len(raw) < dtype.itemsize:
                shrank(info)
            out[n] = np.frombuffer(raw, dtype)[0]
        return out

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
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
    files: _BaseFiles,
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
    # Read block by block when the tensor is in a safetensors file (a saved 128k-row
    # embedding would otherwise cost a GB of memory); a legacy .bin adapter's is in memory.
    shape: list[int]
    if isinstance(source, TensorInfo):
        shape, base_dtype, held = list(source.shape), source.dtype, None
    else:
        held = source.array()  # bfloat16 comes widened to float32
        shape, base_dtype = list(held.shape), "F16" if held.dtype == np.float16 else "F32"
    rows = shape[0] if shape else 1  # a scalar is one row of one
    cols = int(np.prod(shape)) // rows if rows else 0  # conv: (out, in·k); bias: (out, 1)
    if held is not None:
        held = np.ascontiguousarray(held.reshape(rows, cols))
    upd = math.update(job, rows, cols, "float64")  # left (rows, Σr), right (Σr, cols)
    t = _Tensor(job, source, held, files, rows, cols, base_dtype, upd)
    if upd.finishes:
        _write_finished(t, fd, offset, overflow, kernel, used)
        return
    out = job.out_dtype
    pays = kernel is not None and kernel.pays(upd.rank, cols)
    if kernel is not None and pays and out != "F32" and _kernel_dtype(base_dtype, out, kernel):
        used.add("kernel")
        _write_with_kernel(t, fd, offset, overflow, kernel, used)
        return
    used.add("numpy")
    _write_with_numpy(t, 0, rows, fd, offset, overflow, kernel)


@dataclass
class _Tensor:
    """One job's inputs as the engine holds them: its base (in its file, or ``held`` in
    memory) flattened to (rows, cols), and its update in float64 (``math.update``)."""

    job: Job
    source: Any  # TensorInfo, or an in-memory tensor (then ``held``)
    held: np.ndarray[Any, Any] | None
    files: _BaseFiles
    rows: int
    cols: int
    base_dtype: str
    upd: math.Update

    def read(self, r0: int, r1: int) -> np.ndarray[Any, Any]:
        """W's rows r0:r1 as stored (bfloat16 as its bits): (r1 - r0, cols)."""
        if self.held is not None:
            return self.held[r0:r1]
        return self.files.read_rows(self.source, self.cols, r0, r1)

    @functools.cached_property
    def norms(self) -> rounding.Norms:
        """‖L[i]‖ per row and ‖R[:, j]‖ per column of the update (``rounding.norms``)."""
        return rounding.norms(self.upd.left, self.upd.right)

    @functools.cached_property
    def float32(self) -> tuple[np.ndarray[Any, Any], ...]:
        """The float32 sums' inputs for 16-bit outputs in NumPy: L and R in float32, e per
        row, c per column (``rounding.float32_bounds``) and each row's limit
        (``rounding.float32_limits``)."""
        import numpy as np

        e, c = rounding.float32_bounds(self.upd.left, self.upd.right, self.norms)
        lim = rounding.float32_limits(e, float(c.max(initial=0.0)), self.job.out_dtype)
        left, right = self.upd.left.astype(np.float32), self.upd.right.astype(np.float32)
        return left, right, e, c, lim

    @functools.cached_property
    def bounds(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Per row: the float32 magnitude below which a 16-bit rounding is settled, and the
        float64 error bound that flags float32 roundings (``rounding.row_bounds``)."""
        return rounding.row_bounds(self.upd.left, self.upd.right, self.norms)


# The highest summed rank whose 16-bit outputs the kernel sums in float32: the error bound
# grows with the rank, and past it more vectors are summed again in float64 than the float32
# sums save (plugins/adapterctl-fused/bench/kernel.py, AVX-512: float32 0.6 against 1.2 ns
# per value at rank 16 and 2.0-2.3 against 2.9-3.2 at 64; 1.1-1.6x slower at 128).
FLOAT32_RANK = 64

# Bytes of the base a kernel call reads at once (the rows are read first: ``_BaseFiles``).
KERNEL_READ_BYTES = 4 << 20


def _write_with_kernel(
    t: _Tensor, fd: int, offset: int, overflow: Overflow, kernel: Kernel, used: set[str]
) -> None:
    """A plain job through the compiled kernel: a few MiB of rows read per call, which the
    kernel merges block by block through this worker's buffer and writes itself; the values
    it notes are settled (``rounding``) and written over their places after each call."""
    import numpy as np

    out = t.job.out_dtype
    right = _right_tiles(t.upd.right, kernel)
    upd = t.upd
    fast = float32_inputs(upd.left, upd.right, right, t.norms) if upd.rank <= FLOAT32_RANK else ()
    block = _BUFFERS.get("out", max(KERNEL_BLOCK_ELEMENTS, t.cols), numpy_dtype(out))
    row_in = max(1, int(t.cols * DTYPE_SIZES[t.base_dtype]))
    step = max(kernel.module.TILE_ROWS, KERNEL_READ_BYTES // row_in)
    step -= step % kernel.module.TILE_ROWS
    row_out = t.cols * numpy_dtype(out).itemsize
    noted = _BUFFERS.get("suspects", 1 << 14, np.int64)
    thr = t.bounds[0]
    # The base over a memory map (the kernel guards its reads), else read into a buffer.
    mapped = t.files.mapped(t.source, t.cols) if t.held is None else None
    flagged: list[tuple[Any, Any]] = []  # (flat indices in the tensor, W there) per block
    for r0 in range(0, t.rows, step):
        r1 = min(t.rows, r0 + step)
        w = t.read(r0, r1) if mapped is None else mapped[r0:r1]
        at = offset + r0 * row_out
        rows_fast = (fast[0][r0:r1], fast[1], fast[2][r0:r1], *fast[3:]) if fast else ()
        try:
            inf, n = kernel.module.addmm_round_into(
                fd, at, _raw(block), _raw(w), t.upd.left[r0:r1], right, r1 - r0, t.cols,
                right.shape[1], _KERNEL_CODES[t.base_dtype], _KERNEL_CODES[out], kernel.isa,
                thr[r0:r1], noted, *rows_fast,
            )  # fmt: skip
        except BufferError:  # a mapped page past the end of a file that shrank
            shrank(t.source)
        if n > len(noted):  # more to settle than noted (an adversarial tensor): NumPy redoes it
            used.add("numpy")
            _write_with_numpy(t, r0, r1, fd, at, overflow, kernel)
            continue
        overflow.add(t.job.name, int(inf))
        if n:
            idx = noted[:n] + r0 * t.cols  # flat in the tensor
            if mapped is None:
                rows, cols = np.divmod(noted[:n], t.cols)
                at_w = w[rows, cols]
            else:  # never touch the map outside the kernel: read the few values
                at_w = t.files.read_values(t.source, idx)
            flagged.append((idx, widen(at_w, t.base_dtype)))
    if flagged:  # settled all at once, each written over its place
        idx = np.concatenate([i for i, _ in flagged])
        base = np.concatenate([b for _, b in flagged]).astype(np.float64)
        rows, cols = np.divmod(idx, t.cols)
        values = rounding.settle(t.job, t.upd.left, t.upd.right, base, rows, cols, out)
        size = values.dtype.itemsize
        for i, v in zip(idx.tolist(), values.view(np.uint8).reshape(-1, size), strict=True):
            pwrite_all(fd, v, offset + i * size)


def _write_with_numpy(
    t: _Tensor, r0: int, r1: int, fd: int, offset: int, overflow: Overflow, kernel: Kernel | None
) -> None:
    """Rows r0:r1 of a plain job in NumPy, chunk by chunk: 16-bit outputs up to
    ``FLOAT32_RANK`` summed in float32 and proven as the kernel proves them (the unproven
    settled exactly: ``_round_float32``), others x̂ in float64, rounded once, the flagged
    values settled; written from ``offset`` on."""
    import numpy as np

    upd, out = t.upd, t.job.out_dtype
    float32 = out != "F32" and 0 < upd.rank <= FLOAT32_RANK
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is counted, then refused
        for c0, c1 in row_chunks(r1 - r0, t.cols, kernel):
            w = t.read(r0 + c0, r0 + c1)
            if float32:
                data, inf = _round_float32(t, w, r0 + c0)
            else:
                x = _sums(t, w, r0 + c0)  # (c1 - c0, cols) float64
                data, inf = _round_exact(t, w, x, r0 + c0)
            overflow.add(t.job.name, inf)
            offset += pwrite_all(fd, data.reshape(-1).view(np.uint8), offset)  # bf16: no buffers


def _settle(
    t: _Tensor, w: np.ndarray[Any, Any], rows: Any, cols: Any, r0: int
) -> np.ndarray[Any, Any]:
    """``rounding.settle`` of the elements (rows, cols) of the block ``w`` (rows r0: of W)."""
    base = widen(w[rows, cols], t.base_dtype).astype("float64")
    return rounding.settle(t.job, t.upd.left, t.upd.right, base, rows + r0, cols, t.job.out_dtype)


def _round_float32(
    t: _Tensor, w: np.ndarray[Any, Any], r0: int
) -> tuple[np.ndarray[Any, Any], int]:
    """Rows r0: of a 16-bit output: v = fl32(W + L·R) with the sums in float32 (``sgemm``),
    rounded to nearest even; the values ``rounding.float32_unproven`` cannot prove summed
    again in float64 and rounded to float32 to odd first (``rounding.to_odd32``), the few
    still undecided settled exactly; and how many finite base values came out non-finite.
    In this worker's buffer."""
    import numpy as np

    left, right, e, c, lim = t.float32
    n, cols = w.shape
    v = _BUFFERS.get("work", n * cols, np.float32).reshape(n, cols)
    np.matmul(left[r0 : r0 + n], right, out=v)  # (rows, Σr) @ (Σr, cols), from zero
    if t.base_dtype == "BF16":
        np.add(
            v, widen_bf16(w, out=_BUFFERS.get("base", n * cols, np.float32).reshape(n, cols)), out=v
        )
    else:
        np.add(v, w, out=v)  # float16 widens exactly
    out = t.job.out_dtype
    size = n * cols
    scratch = tuple(
        _BUFFERS.get(name, size, dtype).reshape(n, cols)
        for name, dtype in (("f1", np.float32), ("f2", np.float32), ("f3", np.float32),
                            ("flag", np.bool_), ("b", np.bool_))
    )  # fmt: skip
    unproven = rounding.float32_unproven(v, e[r0 : r0 + n], c, lim[r0 : r0 + n], out, scratch)
    flagged = np.flatnonzero(unproven)
    if len(flagged):  # summed again in float64 and rounded to odd, as the kernel does
        rows, cols_ = np.divmod(flagged, cols)
        x = widen(w[rows, cols_], t.base_dtype).astype(np.float64)
        x += np.einsum("nk,nk->n", t.upd.left[r0 + rows], t.upd.right[:, cols_].T)
        v.reshape(-1)[flagged] = rounding.to_odd32(x)
    data, _ = _round_rows(v, out)
    if len(flagged):  # what is left: a float64 sum on a midpoint, or one that cancelled
        s = v.reshape(-1)[flagged][:, None]  # (n, 1)
        thr = t.bounds[0][r0 + rows]
        left = np.flatnonzero(rounding.suspect_mask(s, s.view(np.int32), thr, out))
        if len(left):
            at = flagged[left]
            data.reshape(-1)[at] = _settle(t, w, rows[left], cols_[left], r0).view(data.dtype)
    return data, _fresh_nonfinite(t, data, v, w, out)


def _sums(t: _Tensor, w: np.ndarray[Any, Any], r0: int) -> np.ndarray[Any, Any]:
    """x̂ = W + L·R for the rows ``w`` (rows r0: of W) in float64 (``rounding``: the sum runs
    from zero, the base is added last), in this worker's buffer."""
    import numpy as np

    n, cols = w.shape
    x = _BUFFERS.get("x64", n * cols, np.float64).reshape(n, cols)
    if t.base_dtype == "BF16":  # float16 and float32 widen exactly in the add or copy
        w = widen_bf16(w, out=_BUFFERS.get("base", n * cols, np.float32).reshape(n, cols))
    if t.upd.rank:
        np.matmul(t.upd.left[r0 : r0 + n], t.upd.right, out=x)  # (rows, Σr) @ (Σr, cols)
        np.add(x, w, out=x)
    else:
        np.copyto(x, w)
    return x


def _round_exact(
    t: _Tensor, w: np.ndarray[Any, Any], x: np.ndarray[Any, Any], r0: int
) -> tuple[np.ndarray[Any, Any], int]:
    """Rows r0: of the output: x̂ (rows, cols) float64 rounded once into the output dtype, the
    values ``rounding`` flags settled exactly; and how many finite base values (``w``, as
    stored) came out non-finite. In this worker's buffer (bfloat16 as its bits)."""
    import numpy as np

    out = t.job.out_dtype
    n, cols = x.shape
    if out == "F32":
        data = _BUFFERS.get("out32", n * cols, np.float32).reshape(n, cols)
        np.copyto(data, x, casting="same_kind")  # float64 -> float32: one rounding
        err = t.bounds[1][r0 : r0 + n]
        flagged = np.flatnonzero(rounding.f32_suspect_mask(x, x.view(np.int64), err))
    else:
        s = _BUFFERS.get("work", n * cols, np.float32).reshape(n, cols)
        np.copyto(s, x, casting="same_kind")
        data, _ = _round_rows(s, out)
        thr = t.bounds[0][r0 : r0 + n]
        flagged = np.flatnonzero(rounding.suspect_mask(s, s.view(np.int32), thr, out))
    if len(flagged):
        rows, cols_ = np.divmod(flagged, cols)
        data.reshape(-1)[flagged] = _settle(t, w, rows, cols_, r0).view(data.dtype)
    return data, _fresh_nonfinite(t, data, x, w, out)


def _fresh_nonfinite(
    t: _Tensor,
    data: np.ndarray[Any, Any],
    x: np.ndarray[Any, Any],
    w: np.ndarray[Any, Any],
    out: str,
) -> int:
    """How many values of the rounded rows ``data`` are ±inf or NaN where the base's are
    finite (overflow, or non-finite factors): one max/min pass when there are none."""
    import numpy as np

    limit = _FINITE_LIMIT[out]
    if x.size == 0 or (float(x.max()) < limit and float(x.min()) > -limit):
        return 0
    wide = widen(data, out) if out == "BF16" else data
    base = widen(w, t.base_dtype)
    return int(np.count_nonzero(~np.isfinite(wide) & np.isfinite(base)))


# Below these magnitudes a value rounds to a finite one in every output dtype.
_FINITE_LIMIT = {"BF16": 3.38e38, "F16": 65504.0, "F32": 3.4e38}


def _write_finished(
    t: _Tensor, fd: int, offset: int, overflow: Overflow, kernel: Kernel | None, used: set[str]
) -> None:
    """A job with work after the sum (DoRA, lora biases): V = W + L·R rounded to float32
    (by the kernel where it pays, else NumPy), finished in float32, rounded once."""
    import numpy as np

    rows, cols = t.rows, t.cols
    upd = replace(
        t.upd,
        magnitude=None if t.upd.magnitude is None else t.upd.magnitude.astype(np.float32),
        bias=None if t.upd.bias is None else t.upd.bias.astype(np.float32),
    )
    pays = kernel is not None and kernel.pays(upd.rank, cols)
    use_kernel = kernel is not None and pays and _kernel_dtype(t.base_dtype, "F32", kernel)
    right = _right_tiles(upd.right, kernel) if kernel is not None and use_kernel else None
    used.add("kernel" if use_kernel else "numpy")
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN round as torch rounds them
        for r0, r1 in row_chunks(rows, cols, kernel):
            w = t.read(r0, r1)
            if kernel is not None and right is not None:
                v = _kernel_rows(w, t.base_dtype, upd.left[r0:r1], right, kernel)
            else:
                v = _BUFFERS.get("work", (r1 - r0) * cols, np.float32).reshape(r1 - r0, cols)
                np.copyto(v, _sums(t, w, r0), casting="same_kind")
            math.finish(v, upd, slice(r0, r1))
            data, inf = _round_rows(v, t.job.out_dtype)
            overflow.add(t.job.name, inf)
            offset += pwrite_all(fd, data.reshape(-1).view(np.uint8), offset)


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
    kernel: Kernel,
) -> np.ndarray[Any, Any]:
    """W + L·R for the rows ``w`` (rows, cols), of safetensors dtype ``w_dtype`` held as
    ``numpy_dtype`` holds it, with the compiled ``kernel`` (float64 factors, ``right`` in its
    tiles: ``_right_tiles``), rounded once to float32, in this worker's buffer."""
    import numpy as np

    rows, cols = w.shape
    data = _BUFFERS.get("work", rows * cols, np.float32).reshape(rows, cols)
    kernel.module.addmm_round(
        _raw(data),
        _raw(w),
        left,  # (rows, r) float64
        right,  # (ceil(cols / T), r, T) float64: _right_tiles
        rows,
        cols,
        right.shape[1],
        _KERNEL_CODES[w_dtype],
        _KERNEL_CODES["F32"],
        kernel.isa,
    )
    return data


def _raw(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``a`` as the kernel takes it: bfloat16/float16 as their 16 bits, float32 as it is."""
    import numpy as np

    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.float32)


def _right_tiles(right: np.ndarray[Any, Any], kernel: Kernel) -> np.ndarray[Any, Any]:
    """``right`` (r, cols) in the kernel's layout: tiles of T columns, (ceil(cols / T), r, T),
    float64, zero-padded, so that the r·T values a tile of the output needs are contiguous."""
    import numpy as np

    rank, cols = right.shape
    tile = kernel.module.TILE_COLS
    n = -(-cols // tile)
    padded = np.zeros((rank, n * tile), np.float64)
    padded[:, :cols] = right
    return np.ascontiguousarray(padded.reshape(rank, n, tile).transpose(1, 0, 2))


def float32_inputs(
    left: np.ndarray[Any, Any],
    right: np.ndarray[Any, Any],
    tiles: np.ndarray[Any, Any],
    norms: rounding.Norms | None = None,
) -> tuple[Any, ...]:
    """The compiled kernel's float32 sums' inputs for 16-bit outputs: L (rows, r) and R's
    ``tiles`` (``_right_tiles``) rounded to float32, the error bounds' factors per row and
    per column (``rounding.float32_bounds``; the columns padded to the tiles'), and whether
    the float32 tiles hold R exactly (R = A, stored in 32 bits or fewer, as a rule: the
    kernel's float64 recomputations then read them, hot in cache). ``norms``:
    ``rounding.norms`` of the update, where already computed."""
    import numpy as np

    err, cnorm = rounding.float32_bounds(left, right, norms)
    cnorm = np.pad(cnorm, (0, tiles.shape[0] * tiles.shape[2] - right.shape[1]))
    tiles32 = tiles.astype(np.float32)
    exact = bool(np.array_equal(tiles32, tiles))
    return left.astype(np.float32), tiles32, err, cnorm, exact


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
