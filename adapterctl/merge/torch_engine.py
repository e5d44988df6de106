"""The merge's torch engine: CUDA, bitsandbytes 4-bit in or out, DoRA and ``--method``.

``run_merge`` hands a plan to this engine when ``numpy_engine`` cannot take it. Shards are
written one after the other, tensor by tensor in header order: a read-ahead thread loads the
next tensors (checked reads into a ring of reused buffers, pinned for CUDA), the
calling thread merges row chunks in float32 on the device (W + L·R with one ``addmm``, the
DoRA rescaling, lora biases, all from ``math``; whole tensors where a method, a 4-bit output or a
column-wise DoRA norm needs them), and a writer thread rounds each chunk once into the output
dtype and appends it to the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.merge import math, rounding
from adapterctl.merge.plan import CHUNK_ELEMENTS, RING, Job, LayerError, MergePlan
from adapterctl.merge.writing import Overflow, copy_tensor_bytes, shrank
from adapterctl.tensorfile import BYTES_READ, TORCH_DTYPE_NAMES, TensorInfo, header_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch

# Elements whose rounding was settled exactly: (flat indices in the chunk, stored values).
Settled = tuple["np.ndarray[Any, Any]", "np.ndarray[Any, Any]"] | None


def write_shards(
    plan: MergePlan,
    tmp: Path,
    device: str,
    progress: Callable[[int, int], None] | None = None,
    durable: bool = False,
    overflow: Overflow | None = None,
) -> list[LayerError]:
    """Write every planned shard into the folder ``tmp``, merging on ``device``.

    Returns the per-layer delta errors of 4-bit outputs (empty otherwise); ``overflow``
    counts values that became ±inf in float16 outputs.
    """
    import torch

    dev = torch.device(device)
    with _one_compute_thread(dev):
        return _write_shards(plan, tmp, dev, progress, durable, overflow or Overflow())


def load_inputs(job: Job) -> dict[str, torch.Tensor]:
    """One job's input tensors, read into fresh CPU tensors (for verification)."""
    return _load_inputs(job, pin=False)


@contextmanager
def _one_compute_thread(dev: torch.device) -> Iterator[None]:
    """On the CPU, run torch's operators single-threaded while merging.

    The merge already keeps the cores busy with its own threads (merging, rounding and
    writing, reading ahead); torch's intra-op threads on top of them oversubscribe the cores
    and spin between the many small chunk operations (measured: about 1.5 s slower on 2 cores).
    """
    import torch

    if dev.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_shards(
    plan: MergePlan,
    tmp: Path,
    dev: torch.device,
    progress: Callable[[int, int], None] | None,
    durable: bool,
    overflow: Overflow,
) -> list[LayerError]:
    headers = [header_bytes(shard.entries(), plan.header_metadata) for shard in plan.shards]
    total = sum(len(h) for h in headers) + plan.bytes_out
    done = 0
    layers: list[LayerError] = []
    ws = _Workspace(dev)
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterctl-read") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterctl-write") as wpool,
    ):
        for shard, header in zip(plan.shards, headers, strict=True):
            path = tmp / shard.name
            with open(path, "wb", buffering=0) as fh:
                _write_all(fh, header)
                done += len(header)
                writer = _Writer(fh, wpool, overflow)
                ws.writer = writer
                for job, inputs in _read_ahead(pool, shard.jobs, dev):
                    if job.copy_bytes:
                        assert job.source is not None
                        writer.drain()  # everything before this tensor is written
                        at = fh.tell()
                        copy_tensor_bytes(job.source, fh.fileno(), at)
                        fh.seek(at + job.source.nbytes)
                        done += job.source.nbytes
                    else:
                        layer = _write_job(job, inputs, fh, writer, dev, ws)
                        done += job.nbytes_out
                        if layer is not None:
                            layers.append(layer)
                    if progress is not None:
                        progress(done, total)
                writer.drain()
                if durable:
                    os.fsync(fh.fileno())
    return layers


def _read_ahead(
    pool: ThreadPoolExecutor, jobs: list[Job], dev: torch.device
) -> Iterator[tuple[Job, dict[str, torch.Tensor]]]:
    """Yield (job, its input tensors), reading the next jobs' inputs while this one computes.

    Base tensors are read into a ring of reused buffers, pinned for CUDA (one more than the
    read-ahead depth, so the buffer being merged is never the one being filled): fresh memory
    for every tensor costs page faults that dominate a read from the page cache. Reads, not
    memory maps: a base that shrinks mid-merge is an error (``shrank``), not a SIGBUS.
    """
    pending: list[tuple[Job, Future[dict[str, torch.Tensor]] | None]] = []
    it = iter(jobs)
    depth = 2
    ring: list[torch.Tensor | None] = [None] * (depth + 1)
    turn = 0

    def submit() -> None:
        nonlocal turn
        job = next(it, None)
        if job is None:
            return
        fut = None
        if not job.copy_bytes:
            fut = pool.submit(_load_inputs, job, dev.type == "cuda", ring, turn)
            turn = (turn + 1) % len(ring)
        pending.append((job, fut))

    for _ in range(depth):
        submit()
    while pending:
        job, fut = pending.pop(0)
        submit()
        yield job, (fut.result() if fut is not None else {})


def _load_inputs(
    job: Job,
    pin: bool,
    ring: list[torch.Tensor | None] | None = None,
    slot: int = 0,
) -> dict[str, torch.Tensor]:
    """Read one job's input tensors (in the read-ahead thread). A plain base tensor is read
    into ``ring[slot]`` when a ring is given (pinned, for CUDA; grown when too small)."""
    if job.replace is not None:
        return {"w": job.replace.load()}
    assert job.source is not None
    if job.quant_in is None:
        if ring is None:
            return {"w": _read_tensor(job.source, pin)}
        import torch

        buf = ring[slot]
        if buf is None or buf.numel() < job.source.nbytes:
            buf = torch.empty(job.source.nbytes, dtype=torch.uint8, pin_memory=pin)
            ring[slot] = buf
        return {"w": _read_tensor(job.source, pin, buf[: job.source.nbytes])}
    return {info.name: _read_tensor(info, pin) for info in (job.source, *job.quant_aux)}


def _read_tensor(info: TensorInfo, pin: bool, buf: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor's bytes, read into ``buf`` (uint8, exactly its size) or a new buffer."""
    import torch

    dtype = getattr(torch, TORCH_DTYPE_NAMES[info.dtype])
    if buf is None:
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    with open(info.local_path, "rb", buffering=0) as fh:
        fh.seek(info.start)
        view = _buffer(buf.numpy()) if info.nbytes else memoryview(b"")
        got = 0
        while got < info.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                shrank(info)
            got += n
    BYTES_READ.add(info.nbytes)
    return buf.view(dtype).reshape(info.shape)


class _Workspace:
    """Buffers reused across tensors, so merging allocates nothing per chunk: rings of float32
    chunks on the device (small enough to stay in cache) and of output-dtype staging chunks
    on the host (pinned for CUDA). A slot is reused only once the writer thread, which rounds
    each chunk into its staging buffer and writes it, is done with it."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.writer: _Writer | None = None  # the current shard's writer
        self._work: list[torch.Tensor | None] = [None] * RING
        self._host: list[torch.Tensor | None] = [None] * RING
        self._next_work = self._next_host = 0
        self.work_slot: int | None = None

    def _wait(self, key: tuple[str, int]) -> None:
        if self.writer is not None:
            self.writer.wait_for(key)

    def work(self, rows: int, cols: int) -> torch.Tensor:
        import torch

        i = self._next_work
        self._next_work = (i + 1) % RING
        self._wait(("work", i))
        n = rows * cols
        buf = self._work[i]
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=self.dev)
            self._work[i] = buf
        self.work_slot = i
        return buf[:n].view(rows, cols)

    def is_work(self, t: torch.Tensor) -> bool:
        """True if ``t`` is the chunk ``work`` handed out last (so its slot must be held)."""
        slot = self.work_slot
        buf = self._work[slot] if slot is not None else None
        return buf is not None and t.data_ptr() == buf.data_ptr()

    def host(self, like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        import torch

        i = self._next_host
        self._next_host = (i + 1) % RING
        self._wait(("host", i))
        nbytes = like.numel() * torch.empty((), dtype=dtype).element_size()
        buf = self._host[i]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.dev.type == "cuda")
            self._host[i] = buf
        return buf[:nbytes].view(dtype).view(like.shape), i


class _Writer:
    """Rounds chunks into their output dtype and writes them, in order, in a background
    thread, so merging the next chunk overlaps with this one's rounding and writing.
    ``wait_for(key)`` blocks until the buffer ``key`` is free again; ``drain()`` until
    everything queued is written."""

    def __init__(self, fh: Any, pool: ThreadPoolExecutor, overflow: Overflow) -> None:
        self.fh = fh
        self.pool = pool
        self.overflow = overflow
        self.pending: dict[tuple[str, int], Future[Any]] = {}
        self.last: Future[Any] | None = None

    def round_and_write(
        self,
        name: str,
        chunk: torch.Tensor,
        host: torch.Tensor,
        keys: tuple[tuple[str, int], ...],
        settled: Settled = None,
    ) -> None:
        fut = self.pool.submit(_round_and_write, self.fh, chunk, host, name, self.overflow, settled)
        self.last = fut
        for key in keys:
            self.pending[key] = fut

    def wait_for(self, key: tuple[str, int]) -> None:
        fut = self.pending.pop(key, None)
        if fut is not None:
            fut.result()

    def drain(self) -> None:
        for fut in list(self.pending.values()):
            fut.result()
        self.pending.clear()
        if self.last is not None:
            self.last.result()
            self.last = None


def _round_and_write(
    fh: Any,
    chunk: torch.Tensor,
    host: torch.Tensor,
    name: str,
    overflow: Overflow,
    settled: Settled = None,
) -> None:
    import torch

    host.copy_(chunk)  # the one rounding: float32 -> output dtype
    if settled is not None:  # the values whose rounding ``rounding.settle`` decided
        flagged, values = settled
        host.reshape(-1).view(torch.uint8).numpy().view(values.dtype)[flagged] = values
    _count_overflow(name, host, chunk, overflow)
    _write_all(fh, host.reshape(-1).view(torch.uint8).numpy())


def _write_job(
    job: Job,
    inputs: dict[str, torch.Tensor],
    fh: Any,
    writer: _Writer,
    dev: torch.device,
    ws: _Workspace,
) -> LayerError | None:
    """Merge one job and write its stored bytes; returns the 4-bit delta error when quantising.

    Unquantised outputs stream chunk by chunk (float32 chunk → output dtype → file); a 4-bit
    output needs the whole merged weight, so it is assembled first.
    """
    import torch

    out_dtype = getattr(torch, TORCH_DTYPE_NAMES[job.out_dtype])
    if job.quant_in is not None:
        from adapterctl import nf4

        w = nf4.dequantize(inputs, job.name, device=dev)  # float32, logical shape
    else:
        w = inputs["w"]
    if job.transpose_out:
        writer.drain()
        merged_t = torch.cat([c.clone() for c, _ in _merged_rows(job, w, dev, ws)]).T
        rounded = merged_t.to(out_dtype)
        _count_overflow(job.name, rounded, merged_t, writer.overflow)
        _write_all(fh, rounded.cpu().contiguous().view(torch.uint8).numpy())
        return None
    if job.quantize is None:
        chunks = (
            _exact_rows(job, w, dev, ws, writer.overflow)
            if rounding.exact(job)
            else _merged_rows(job, w, dev, ws)
        )
        for chunk, settled in chunks:
            host, slot = ws.host(chunk, out_dtype)
            keys: tuple[tuple[str, int], ...] = (("host", slot),)
            if ws.is_work(chunk) and ws.work_slot is not None:
                keys += (("work", ws.work_slot),)
            writer.round_and_write(job.name, chunk, host, keys, settled)
        return None
    writer.drain()
    from adapterctl import nf4

    rows = w.shape[0]
    merged = torch.empty((rows, w[0].numel()), dtype=torch.float32, device=dev)  # (out, in)
    r0 = 0
    for chunk, _ in _merged_rows(job, w, dev, ws):
        merged[r0 : r0 + chunk.shape[0]] = chunk
        r0 += chunk.shape[0]
    merged = merged.reshape(w.shape)
    spec = job.quantize
    stored = nf4.quantize(
        merged, job.name, quant_type=spec.quant_type, blocksize=spec.blocksize,
        double_quant=spec.double_quant, dtype=TORCH_DTYPE_NAMES[job.out_dtype],
        method=spec.method, pad_state=True,
    )  # fmt: skip
    for name, _dtype, _shape, nbytes in job.stored():
        data = stored[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise RuntimeError(f"internal: {name} has {data.numel()} bytes, planned {nbytes}")
        _write_all(fh, data.numpy())
    if not job.merged:
        return None
    base32 = w.to(dev, torch.float32)
    requant = nf4.dequantize(stored, job.name, device=dev)
    delta = merged - base32
    return LayerError(
        name=job.name,
        delta_norm=float(delta.norm()),
        delta_error=nf4.delta_error(base32, delta, requant),
    )


def _count_overflow(
    name: str, rounded: torch.Tensor, source: torch.Tensor, overflow: Overflow
) -> None:
    """Count values that became ±inf in rounding (their float32 source is finite)."""
    import torch

    if rounded.dtype != source.dtype and not bool(torch.isfinite(rounded).all()):
        fresh = ~torch.isfinite(rounded) & torch.isfinite(source.to(rounded.device))
        overflow.add(name, int(fresh.sum()))


def _write_all(fh: Any, data: Any) -> None:
    """Write every byte of ``data`` (an unbuffered file may write fewer per call)."""
    view = memoryview(data).cast("B")
    while view:
        n = fh.write(view)
        view = view[n:]


def _buffer(array: Any) -> memoryview:
    """A numpy array's bytes as a memoryview (no copy)."""
    return memoryview(array)


def _merged_rows(
    job: Job, w: torch.Tensor, dev: torch.device, ws: _Workspace
) -> Iterator[tuple[torch.Tensor, Settled]]:
    """Yield W' in float32 row chunks, in order (``adapterctl.merge.math``: W + L·R, DoRA's
    rescaling, lora biases), each with None (nothing to settle). Chunks are views of a reused
    buffer: consume each before asking for the next; a ``--method`` merge or column-wise DoRA
    norms come as one whole tensor."""
    import torch

    rows = w.shape[0] if w.ndim else 1  # a scalar is one row of one
    flat = w.reshape(rows, -1)  # conv kernels flattened: (out, in·k); a bias is (out, 1)
    cols = flat.shape[1]
    upd = math.update(job, rows, cols).map(lambda a: torch.from_numpy(a).to(dev))
    if job.combine is not None:
        v = w.to(dev, torch.float32, copy=True)  # own copy: w may be a read-only map
        v.add_(math.combined(job, v))
        yield math.finish(v.reshape(rows, cols), upd), None
        return
    if not upd.row_local:
        # DoRA on a weight stored (in, out): its per-output norms run down columns: whole.
        v = flat.to(dev, torch.float32, copy=True)  # w may be a read-only map
        v.addmm_(upd.left, upd.right)  # (in, r) @ (r, out)
        yield math.finish(v, upd), None
        return
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = ws.work(r1 - r0, cols)
        chunk.copy_(flat[r0:r1], non_blocking=True)  # (rows, cols) float32
        if upd.rank:
            chunk.addmm_(upd.left[r0:r1], upd.right)  # (rows, Σr) @ (Σr, cols)
        yield math.finish(chunk, upd, slice(r0, r1)), None


def _exact_rows(
    job: Job, w: torch.Tensor, dev: torch.device, ws: _Workspace, overflow: Overflow
) -> Iterator[tuple[torch.Tensor, Settled]]:
    """Yield a plain job's output in row chunks, in order: x̂ = L·R + W in float64 on the
    device (``adapterctl.merge.rounding``), rounded to float32 into a reused buffer, and the
    elements whose final rounding ``rounding`` settled (flat indices in the chunk, values in
    the output's storage), which the writer puts in place of its own rounding."""
    import numpy as np
    import torch

    rows = w.shape[0] if w.ndim else 1
    flat = w.reshape(rows, -1)  # (out, in), conv kernels (out, in·k), a bias (out, 1)
    cols = flat.shape[1]
    upd = math.update(job, rows, cols, "float64")
    thr, err = rounding.row_bounds(upd.left, upd.right)
    on = upd.map(lambda a: torch.from_numpy(a).to(dev))
    thr_d, err_d = torch.from_numpy(thr).to(dev), torch.from_numpy(err).to(dev)
    out = job.out_dtype
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = flat[r0:r1].to(dev, torch.float64)  # W, exact
        if upd.rank:
            x += on.left[r0:r1] @ on.right  # (rows, Σr) @ (Σr, cols), summed from zero
        chunk = ws.work(r1 - r0, cols)
        chunk.copy_(x)  # float64 -> float32: one rounding
        if not bool(torch.isfinite(chunk).all()):  # beyond float32, from a finite base value
            base = flat[r0:r1].to(dev)
            overflow.add(job.name, int((~torch.isfinite(chunk) & torch.isfinite(base)).sum()))
        if out == "F32":
            mask = rounding.f32_suspect_mask(x, x.view(torch.int64), err_d[r0:r1])
        else:
            mask = rounding.suspect_mask(chunk, chunk.view(torch.int32), thr_d[r0:r1], out)
        flagged = mask.reshape(-1).nonzero().reshape(-1).cpu().numpy()
        settled: Settled = None
        if len(flagged):
            r, c = np.divmod(flagged, cols)
            stored = flat[r0:r1].reshape(-1)[torch.from_numpy(flagged).to(flat.device)]
            w64 = stored.to("cpu", torch.float64).numpy()
            values = rounding.settle(job, upd.left, upd.right, w64, r + r0, c, out)
            settled = (flagged, values)
        yield chunk, settled
