"""GRIB encoding in writer processes, so it never shares the model's interpreter lock or core.

anemoi-inference's GRIB output encodes ~100 messages/s on one core: at 120 fields a step and a
1-2 s GPU step, encoding on a thread of the model's process sets the member's pace and the GPU
waits. Here each step is encoded by one of ``N`` writer processes and appended to its window's
file in step order:

- **Model process, one ordered stage** (the thread of ``windows.WindowedGribWriter``): applies the
  accumulation post-processor once, in step order, routes the step to its window (opening the
  window's streaming upload, which waits for a disk slot), copies the step's arrays into a free
  block of a shared-memory ring (numpy copies release the GIL; the runner's column views are
  copied by row blocks, ``windows.copy_fields_into``) and queues a small
  task (step number, window file, array layout, the state's other keys).
- **Writer processes** (spawned once per worker process and kept across members): take tasks in
  order, encode the step with anemoi-inference's own in-memory GRIB output (``GribMemoryOutput``,
  the same encoder, keys and templates as the ``grib`` file output, so the bytes are identical),
  free the block, wait for the step's turn and append the bytes to the window's file. Steps are
  numbered across the pool's life; a step is appended only after the step before it, so each
  window's file grows in step order (what ``growing.GrowingFile`` streams to the bucket) while
  ``N`` steps are encoded at once.
- **Collector thread** (model process): counts appended steps per window; a window whose steps
  are all appended is complete (its upload sends the last chunk). It also watches the writer
  processes: one that dies or fails fails the member with exit 12.

Bounds (logged when the ring is allocated): the ring has ``N + 2`` blocks of one step each
(N320, 120 float32 fields: 120 x 542080 x 4 B = 260 MB a block, so 3.4 GB for 11 writers); the
model process queues at most 2 more steps (references to the runner's fresh arrays, no copy);
each writer holds at most one encoded step (~2 bytes a value: ~130 MB) while it waits for its
turn. So memory is bounded by ``N + 4`` steps of arrays plus ``N`` encoded steps, whatever the
model's pace; when writers fall behind, the model waits for a free block. Disk stays bounded by
the uploader's two windows.

A writer that fails or dies, SIGTERM, or any failure of the member tears the pool down (writers
terminated, ring unlinked from /dev/shm); the next member starts a fresh pool. The pool is also
stopped at interpreter exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from typing import Any

from aifs.layout import Window, forecast_filename, forecast_object, window_of
from aifs.worker.errors import InferenceFailed
from aifs.worker.windows import _DONE, WindowedGribWriter, copy_fields_into, ensemble_encoding

LOG = logging.getLogger("aifs.worker")

#: Environment variable for the number of writer processes (``--grib-writers`` wins over it).
WRITERS_ENV = "AIFS_GRIB_WRITERS"
#: Extra ring blocks beyond one per writer: one queued for the next free writer, one being filled.
SPARE_BLOCKS = 2
#: Shared-memory segment names start with this (tests look for leftovers under /dev/shm).
SHM_PREFIX = "aifs-grib-"
_ALIGN = 64


def default_writers() -> int:
    """Cores this process may use, less one for the model's own thread: at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def writers_setting(value: int | None = None) -> int:
    """The number of writer processes: ``value``, else $AIFS_GRIB_WRITERS, else ``default_writers()``.

    0 keeps GRIB encoding on a thread of the model's process (the single in-process writer).
    """
    if value is None:
        text = os.environ.get(WRITERS_ENV, "").strip()
        if not text:
            return default_writers()
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"${WRITERS_ENV} must be a whole number of writer processes, got {text!r}") from None
    if value < 0:
        raise ValueError(f"the number of GRIB writer processes must be 0 or more, got {value}")
    return value


def make_grib_writer(writers: int, **kwargs) -> WindowedGribWriter:
    """The member's GRIB writer: in-process thread (``writers == 0``) or ``writers`` processes."""
    if writers <= 0:
        return WindowedGribWriter(**kwargs)
    return ParallelGribWriter(writers=writers, **kwargs)


# -- the pool (model process) ----------------------------------------------------------------------


@dataclasses.dataclass
class _Block:
    name: str
    index: int


class WriterPool:
    """``n`` spawned writer processes, their task and result queues, the shared-memory ring."""

    def __init__(self, n: int, checkpoint_path: str):
        self.n, self.checkpoint_path = n, checkpoint_path
        ctx = mp.get_context("spawn")  # never fork a process holding CUDA, torch and upload threads
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.turn = ctx.Value("q", 0, lock=False)  # the next step number to append (guarded by cond)
        self.cond = ctx.Condition()
        self.next_seq = 0
        self.started = time.perf_counter()
        self.ready = 0
        self.ring: list[Any] = []  # SharedMemory blocks
        self.block_bytes = 0
        self.free: queue.Queue[int] = queue.Queue()
        self.failure: str | None = None
        self.handler = None  # the member's ParallelGribWriter
        self._stopping = False
        self._lock = threading.Lock()
        self.procs = [ctx.Process(target=_writer_main, name=f"aifs-grib-writer-{i}", daemon=True,
                                  args=(i, checkpoint_path, self.tasks, self.results, self.turn, self.cond, os.getpid()))
                      for i in range(n)]
        for p in self.procs:
            p.start()
        self._collector = threading.Thread(target=self._collect, name="grib-collector", daemon=True)
        self._collector.start()
        LOG.info("[GRIB] %d writer processes started (pids %s)", n, ", ".join(str(p.pid) for p in self.procs))

    @property
    def healthy(self) -> bool:
        return self.failure is None and not self._stopping

    # -- the ring --------------------------------------------------------------------------
    def ensure_ring(self, block_bytes: int, member: int) -> None:
        """Allocate ``n + SPARE_BLOCKS`` blocks of ``block_bytes`` (once; again only if a step grows)."""
        if self.ring and block_bytes <= self.block_bytes:
            return
        from multiprocessing import shared_memory

        if self.ring:
            raise InferenceFailed(member, f"a step needs {block_bytes} bytes, more than the ring's {self.block_bytes}")
        count = self.n + SPARE_BLOCKS
        tag = uuid.uuid4().hex[:8]
        for i in range(count):
            self.ring.append(shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}-{tag}-{i}", create=True,
                                                        size=block_bytes))
            self.free.put(i)
        self.block_bytes = block_bytes
        LOG.info("[GRIB] queue bound: %d steps in shared memory (%d blocks x %.1f MB = %.1f MB) + 2 steps queued in the "
                 "model process + at most %d encoded steps held by writers waiting for their turn",
                 count, count, block_bytes / 1e6, count * block_bytes / 1e6, self.n)

    def acquire(self, interrupt) -> int:
        while True:
            interrupt()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                continue

    # -- results ---------------------------------------------------------------------------
    def _collect(self) -> None:
        while not self._stopping:
            try:
                message = self.results.get(timeout=0.2)
            except queue.Empty:
                message = None
            except (EOFError, OSError):  # the queue was closed by stop()
                return
            if message is not None:
                try:
                    self._handle(message)
                except Exception as exc:  # e.g. a window whose upload cannot complete: the member fails, never hangs
                    LOG.exception("[GRIB] collector")
                    self._fail(f"collecting a writer's result failed: {type(exc).__name__}: {exc}")
            for i, p in enumerate(self.procs):
                if p.exitcode is not None and not self._stopping and self.failure is None:
                    self._fail(f"GRIB writer process {i} (pid {p.pid}) died with exit code {p.exitcode}")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "freed":
            self.free.put(message[1])
        elif kind == "ready":
            self.ready += 1
            if self.ready == self.n:
                LOG.info("[GRIB] %d writer processes ready in %.1f s", self.n, time.perf_counter() - self.started)
        elif kind == "appended":
            handler = self.handler
            if handler is not None:
                handler._appended(*message[1:])
        elif kind == "failed":
            self._fail(message[1])

    def _fail(self, text: str) -> None:
        self.failure = self.failure or text
        LOG.error("[GRIB] %s", text)
        handler = self.handler
        if handler is not None:
            handler._pool_failed(self.failure)

    # -- teardown --------------------------------------------------------------------------
    def stop(self, graceful: bool) -> None:
        """End the writers (asked to exit, or terminated) and unlink the ring; idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if graceful and self.failure is None:
            for _ in self.procs:
                self.tasks.put(None)
            deadline = time.monotonic() + 5
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._collector.join(timeout=5)
        for q in (self.tasks, self.results):
            q.cancel_join_thread()  # nobody reads them any more: never block exit on a flush
            q.close()
        for shm in self.ring:
            try:
                shm.close()
            except BufferError:  # a view still exists in this process: unlinking below still frees it at exit
                pass
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self.ring = []


_POOL: WriterPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(n: int, checkpoint_path: str) -> WriterPool:
    """The process's writer pool for this checkpoint and size, started if there is none fit to use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and (not _POOL.healthy or (_POOL.n, _POOL.checkpoint_path) != (n, checkpoint_path)):
            _POOL.stop(graceful=_POOL.healthy)
            _POOL = None
        if _POOL is None:
            _POOL = WriterPool(n, checkpoint_path)
        return _POOL


def shutdown_pool(graceful: bool = True) -> None:
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.stop(graceful=graceful)


# after multiprocessing's own exit hook is registered, so this runs first (atexit is LIFO) and the
# writers exit through stop(), not through multiprocessing terminating its daemonic children
import multiprocessing.util  # noqa: E402,F401  isort: skip

atexit.register(shutdown_pool)


# -- one member's writer (model process) ---------------------------------------------------------


@dataclasses.dataclass
class _OpenWindow:
    window: Window
    path: str
    upload: Any
    sent: int = 0
    appended: int = 0
    messages: int = 0
    sealed: bool = False  # no more steps will be sent to it
    completed: bool = False


class ParallelGribWriter(WindowedGribWriter):
    """``WindowedGribWriter`` whose thread hands each step to writer processes instead of encoding it.

    Same interface (``put``/``finish``/``abort``, ``closed_windows``, ``write_seconds``), same
    windows, names, accumulation and uploads; ``write_seconds`` sums the writers' encode time.
    """

    def __init__(self, *, writers: int, model, **kwargs):
        self._pool = get_pool(writers, str(model.runner.checkpoint.path))
        self._pool.handler = self
        self._reference_date = None
        self._windows: dict[Window, _OpenWindow] = {}
        self._seq_window: dict[int, Window] = {}
        self._current: _OpenWindow | None = None
        self._state_lock = threading.Lock()
        self._all_done = threading.Event()
        self._inline = False  # encoding on this thread after all: /dev/shm cannot hold the ring
        super().__init__(model=model, **kwargs)

    # -- the writer thread (model process): one ordered stage ---------------------------------
    def _write(self, state: dict) -> None:
        import datetime as dt

        import numpy as np

        if self._inline:
            return super()._write(state)
        hour = int(state["step"] / dt.timedelta(hours=1))
        if hour <= 0:
            return  # the initial state is not part of any (start, end] window
        if not self._pool.ring and not self._ring_fits(state):
            self._inline = True
            return super()._write(state)
        window = window_of(hour, self.lead_time)
        if self._current is None or window != self._current.window:
            self._close_window()
            path = os.path.join(self.output_dir, forecast_filename(self.date, self.member, window.start, window.end))
            # bounded disk: waits while two windows are still local (interrupted if a writer fails)
            upload = self.uploader.open_window(path, forecast_object(self.date, self.member, window.start, window.end),
                                               window, interrupt=self._check_pool)
            with self._state_lock:
                self._current = self._windows[window] = _OpenWindow(window, path, upload)
        processed = self._accumulate.process(state)  # once, in step order, before windowing
        arrays, meta = _split(processed)
        layout, offset = [], 0
        for key, array in arrays:
            layout.append((key, array.dtype.str, array.shape, offset))
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
        self._pool.ensure_ring(max(offset, _ALIGN), self.member)
        index = self._pool.acquire(self._check_pool)
        block = self._pool.ring[index]
        copy_fields_into([(np.ndarray(shape, dtype, buffer=block.buf, offset=at), array)
                          for (key, dtype, shape, at), (_, array) in zip(layout, arrays)])
        seq = self._pool.next_seq
        self._pool.next_seq += 1
        with self._state_lock:
            self._current.sent += 1
            self._seq_window[seq] = self._current.window
        self._pool.tasks.put(("step", seq, self._current.path, block.name, index, block.size, layout, meta,
                              ensemble_encoding(self.member), self.model.runner.reference_date))
        if self.on_step:
            self.on_step(hour)

    def _ring_fits(self, state: dict) -> bool:
        """Whether /dev/shm can hold the ring; if not (a container's 64 MB default), encode on this thread."""
        arrays, _ = _split(state)
        need = (self._pool.n + SPARE_BLOCKS) * sum(-(-a.nbytes // _ALIGN) * _ALIGN for _, a in arrays)
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            return True
        free = st.f_bavail * st.f_frsize
        if need <= free:
            return True
        LOG.warning("[GRIB] member %03d: /dev/shm has %.0f MB free, the writers' ring needs %.0f MB: GRIB is encoded on "
                    "the model process's thread for this member (give the container more shared memory, e.g. docker "
                    "--shm-size or a memory-backed emptyDir on /dev/shm)", self.member, free / 1e6, need / 1e6)
        return False

    def _flush(self) -> None:
        if self._inline:
            return super()._flush()
        self._close_window()

    def _close_window(self) -> None:
        """Seal the window being filled: it completes once its last step is appended."""
        if self._inline:
            return super()._close_window()
        if self._current is None:
            return
        with self._state_lock:
            self._current.sealed = True
            self._maybe_complete(self._current)
        self._current = None

    # -- the collector thread -------------------------------------------------------------------
    def _appended(self, seq: int, messages: int, nbytes: int, seconds: float) -> None:
        with self._state_lock:
            window = self._seq_window.pop(seq, None)
            if window is None:
                return
            w = self._windows[window]
            w.appended += 1
            w.messages += messages
            self.write_seconds += seconds
            self._maybe_complete(w)

    def _maybe_complete(self, w: _OpenWindow) -> None:
        if w.completed or not w.sealed or w.appended != w.sent:
            return
        w.completed = True
        LOG.info("[WINDOW] member %03d h%03d-%03d closed: %s (%d messages, %.1f MB)", self.member, w.window.start,
                 w.window.end, os.path.basename(w.path), w.messages, os.path.getsize(w.path) / 1e6)
        self.closed_windows.append(w.window)
        self.closed_windows.sort(key=lambda x: (x.start, x.end))
        w.upload.complete(w.messages)  # the upload may now send its last chunk and finalize the object
        if all(x.completed for x in self._windows.values()) and self._finishing:
            self._all_done.set()

    def _pool_failed(self, text: str) -> None:
        self._error = self._error or InferenceFailed(self.member, f"GRIB writing failed: {text}")
        self._all_done.set()

    def _check_pool(self) -> None:
        if self._error is not None:
            raise self._error
        if self._pool.failure is not None:
            self._pool_failed(self._pool.failure)
            raise self._error

    # -- the model thread ---------------------------------------------------------------------
    _finishing = False

    def finish(self) -> None:
        """Flush the last window, wait for the writers to append every step; raise if any window failed."""
        self._queue.put(_DONE)
        self._thread.join()
        with self._state_lock:
            self._finishing = True
            if all(w.completed for w in self._windows.values()):
                self._all_done.set()
        while not self._all_done.wait(timeout=0.5):
            self._raise_if_failed()
            self._check_pool()
        if self._pool.handler is self:
            self._pool.handler = None
        self._check_windows()

    def abort(self) -> None:
        """Stop the member: writers terminated, ring unlinked (the next member starts a fresh pool)."""
        self._error = self._error or InferenceFailed(self.member, "aborted")
        super().abort()  # this member's thread first: it may be copying into the ring
        shutdown_pool(graceful=False)


def _split(state: dict) -> tuple[list[tuple[tuple, Any]], dict]:
    """The state's arrays (fields, and any top-level array such as latitudes) and everything else."""
    import numpy as np

    arrays: list[tuple[tuple, Any]] = [(("fields", name), values) for name, values in state["fields"].items()]
    meta = {}
    for key, value in state.items():
        if key == "fields":
            continue
        if isinstance(value, np.ndarray):
            arrays.append(((key,), value))
        else:
            meta[key] = value
    return arrays, meta


# -- the writer processes -------------------------------------------------------------------------


def _writer_main(index: int, checkpoint_path: str, tasks, results, turn, cond, parent: int) -> None:
    # pyproj before eccodes: both bundle libproj; the other order crashes the interpreter at exit
    import pyproj  # noqa: F401  isort: skip
    import io
    import signal

    import numpy as np

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the model process's to handle
    try:
        context, metadata, options = _context(checkpoint_path)
    except BaseException as exc:
        results.put(("failed", f"GRIB writer process {index} could not start: {type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, os.getpid()))
    attached: dict[str, Any] = {}
    outputs: dict[tuple, Any] = {}
    buffer = io.BytesIO()

    def orphaned() -> bool:
        return os.getppid() != parent

    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if orphaned():
                return
            continue
        if task is None:
            break
        _, seq, path, block_name, block_index, block_size, layout, meta, encoding, reference_date = task
        try:
            started = time.perf_counter()
            shm = attached.get(block_name)
            if shm is None:
                from multiprocessing import shared_memory

                shm = attached[block_name] = shared_memory.SharedMemory(name=block_name)
            state = dict(meta)
            state["fields"] = {}
            for key, dtype, shape, at in layout:
                array = np.ndarray(shape, dtype, buffer=shm.buf, offset=at)
                if key[0] == "fields":
                    state["fields"][key[1]] = array
                else:
                    state[key[0]] = array
            okey = (reference_date, encoding["number"])
            output = outputs.get(okey)
            if output is None:
                outputs.clear()
                context.reference_date = reference_date
                output = outputs[okey] = _output(context, metadata, buffer, encoding, options)
            before = output.messages
            output.write_state(state)
            messages = output.messages - before
            del state, array
            results.put(("freed", block_index))  # encoded: the block may take the next step
            seconds = time.perf_counter() - started
            with cond:
                while turn.value != seq:
                    cond.wait(timeout=1.0)
                    if orphaned():
                        return
            with open(path, "ab") as f, buffer.getbuffer() as view:
                f.write(view)
                nbytes = len(view)
            buffer.seek(0)
            buffer.truncate()
            with cond:
                turn.value = seq + 1
                cond.notify_all()
            results.put(("appended", seq, messages, nbytes, seconds))
        except BaseException as exc:  # reported; the member fails and the pool is torn down
            import traceback

            results.put(("failed", f"GRIB writer process {index} failed on a step of {os.path.basename(path)}: "
                                   f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            return


def _context(checkpoint_path: str):
    """anemoi-inference's runner as the outputs' context (metadata only, the weights are never loaded), and
    the checkpoint's GRIB output options: the same rules (field_rules) as the model process's runner."""
    from anemoi.inference.runners.simple import SimpleRunner

    from aifs.worker.model import Model

    model = Model(checkpoint_path, "cpu", None, None)  # the metadata and its field rules, no weights
    runner = SimpleRunner(checkpoint_path, device="cpu", **model.plan.runner_options(model.raw_metadata_variables))
    (metadata,) = runner.checkpoint.multi_dataset_metadata.values()
    return runner, metadata, model.grib_output_options()


def _output(context, metadata, buffer, encoding, options):
    """anemoi-inference's in-memory GRIB output, counting the messages it writes."""
    from anemoi.inference.outputs.gribmemory import GribMemoryOutput

    class CountingGribOutput(GribMemoryOutput):
        messages = 0

        def write_message(self, *args, **kwargs):
            super().write_message(*args, **kwargs)
            self.messages += 1

    return CountingGribOutput(context, metadata, out=buffer, encoding=encoding, write_initial_state=False, **options)
