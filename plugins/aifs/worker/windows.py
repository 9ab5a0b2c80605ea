"""GRIB in 72 h windows, written on a thread of its own so GRIB encoding overlaps the model.

This is the single in-process writer (``--grib-writers 0``); ``grib_writers.ParallelGribWriter``
keeps this thread as its one ordered stage and encodes in writer processes instead.

The runner yields one state per step; the model thread copies it (the runner reuses its dict)
and queues it. The writer thread applies the accumulation post-processor once, in step order
(per-window accumulators would restart sums but still label them from step 0), routes each step
to its window's anemoi-inference GRIB output. Each window's upload starts as the window opens
(the uploader streams the file as it grows) and is completed the moment its last step is written.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import threading
from typing import Any, Callable

from aifs.layout import Window, forecast_filename, forecast_object, window_of, windows
from aifs.worker.errors import InferenceFailed, MemberError

LOG = logging.getLogger("aifs.worker")

_DONE = object()


def ensemble_encoding(member: int) -> dict[str, Any]:
    """GRIB keys that label the output as one perturbed member of an ensemble forecast."""
    return {
        "class": "ai",
        "stream": "enfo",
        "type": "pf",
        "number": member,
        "productDefinitionTemplateNumber": 1,  # individual ensemble forecast; `type: pf` alone fails
    }


def _release_output_path(path: str) -> None:
    """Let a later output in this process write ``path`` again (a rerun of the same member).

    anemoi-inference refuses a path any output of the process has used (a guard against two
    datasets writing one file), and never forgets it. Our windows are closed before reuse.
    """
    from pathlib import Path

    from anemoi.inference import decorators

    getattr(decorators, "UNIQUE_PATHS", {}).get("path", set()).discard(Path(path))


#: Rows a strided field is copied by at a time (``copy_fields_into``): 4096 rows of a 120-field float32
#: output are 2 MB, which stay in cache while every field's part of them is copied out.
GATHER_ROWS = 4096


def copy_fields_into(pairs: list[tuple[Any, Any]]) -> None:
    """Copy each ``(destination, array)`` pair, strided arrays by row blocks.

    The runner hands out each field as a column view of one ``(points, fields)`` array (a stride of
    fields x 4 bytes). Copied field by field, every field reads the whole array again from memory
    (N320, 120 fields: ~0.27 s a step, measured); copied ``GATHER_ROWS`` rows of every field at a
    time, each block is read from memory once and from cache for the other fields (~0.09 s). The
    values are the same either way: this only orders the copies.
    """
    import numpy as np

    strided: dict[int, list[tuple[Any, Any]]] = {}
    for destination, array in pairs:
        if array.ndim == 1 and not array.flags.c_contiguous:
            strided.setdefault(array.shape[0], []).append((destination, array))
        else:
            np.copyto(destination, array, casting="no")
    for points, group in strided.items():
        for start in range(0, points, GATHER_ROWS):
            stop = start + GATHER_ROWS
            for destination, array in group:
                np.copyto(destination[start:stop], array[start:stop], casting="no")


def contiguous_fields(state: dict) -> dict:
    """``state`` with every strided field copied into a contiguous array (the same values).

    The encoder flattens each field before packing it: a column view of the runner's output costs
    ~4 ms a N320 field to flatten (every field reads the whole output again), a contiguous one ~1 ms;
    one row-blocked copy of all of them first costs ~0.09 s a 120-field step, not ~0.4 s.
    """
    import numpy as np

    strided = {name: values for name, values in state["fields"].items()
               if isinstance(values, np.ndarray) and values.ndim == 1 and not values.flags.c_contiguous}
    if not strided:
        return state
    copies = {name: np.empty(values.shape, values.dtype) for name, values in strided.items()}
    copy_fields_into([(copies[name], values) for name, values in strided.items()])
    return {**state, "fields": {**state["fields"], **copies}}


def count_messages(path: str) -> int:
    import eccodes

    with open(path, "rb") as f:
        return eccodes.codes_count_in_file(f)


def copy_state(state: dict) -> dict:
    """A step's state detached from the runner's dicts, which it reuses from step to step.

    The arrays are not copied: anemoi-inference hands out freshly allocated arrays every step
    (tests/worker/test_runner_buffers.py fails if that ever changes), and copying ~220 MB a step
    at N320 would hold the model thread back for nothing.
    """
    copied = dict(state)
    copied["fields"] = dict(state["fields"])
    return copied


class WindowedGribWriter:
    """Writes one member's steps into per-window GRIB files on a background thread."""

    def __init__(self, *, model, date: str, member: int, lead_time: int, output_dir: str, uploader,
                 queue_steps: int = 2, on_step: Callable[[int], None] | None = None):
        self.model, self.date, self.member, self.lead_time = model, date, member, lead_time
        self.output_dir, self.uploader, self.on_step = output_dir, uploader, on_step
        self.expected_windows = windows(lead_time)
        self._accumulate = model.accumulator()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_steps)
        self._window: Window | None = None
        self._output = None
        self._path = ""
        self._upload = None
        self._error: BaseException | None = None
        self.closed_windows: list[Window] = []
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"grib-m{member:03d}", daemon=True)
        self._thread.start()

    # -- model thread ----------------------------------------------------------------------
    def put(self, state: dict) -> None:
        """Queue one step (copied); raises the writer's or an upload's failure as soon as it is known."""
        item = copy_state(state)
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Flush the last window; raise if any window could not be written."""
        self._queue.put(_DONE)
        self._thread.join()
        self._check_windows()

    def _check_windows(self) -> None:
        self._raise_if_failed()
        if self.closed_windows != self.expected_windows:
            got = ", ".join(f"{w.start}-{w.end}" for w in self.closed_windows) or "none"
            raise InferenceFailed(self.member, f"the forecast ended early: windows written {got}")

    def abort(self) -> None:
        """Stop the writer without closing windows as complete (their files are cleaned up by the caller)."""
        self._error = self._error or InferenceFailed(self.member, "aborted")
        while self._thread.is_alive():
            try:
                self._queue.put(_DONE, timeout=0.5)
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
            self._thread.join(timeout=0.5)
        if self._output is not None:
            try:
                self._output.close()
            except Exception:  # the file is deleted anyway
                pass
            _release_output_path(self._path)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        self.uploader.raise_if_failed()

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE or self._error is not None:
                    break
                self._write(item)
            if self._error is None:
                self._flush()
        except MemberError as exc:
            self._error = exc
        except BaseException as exc:  # surfaced to the model thread, never lost on this thread
            self._error = InferenceFailed(self.member, f"GRIB writing failed: {type(exc).__name__}: {exc}")
            LOG.exception("GRIB writer for member %03d failed", self.member)

    def _flush(self) -> None:
        """The last step was written: close the last window."""
        if self._output is not None:
            self._close_window()

    def _write(self, state: dict) -> None:
        import time

        from anemoi.inference.outputs import create_output

        started = time.perf_counter()
        hour = int(state["step"] / dt.timedelta(hours=1))
        if hour <= 0:
            return  # the initial state is not part of any (start, end] window
        window = window_of(hour, self.lead_time)
        if window != self._window:
            if self._output is not None:
                self._close_window()
            self._window = window
            self._path = os.path.join(self.output_dir, forecast_filename(self.date, self.member, window.start, window.end))
            # bounded disk: waits while two windows are still local; then streams the file as it is written
            self._upload = self.uploader.open_window(self._path, forecast_object(self.date, self.member, window.start,
                                                                                 window.end), window)
            # the checkpoint's own output rules (field_rules): backward transforms, GRIB2 keys per parameter
            config = {"grib": {"path": self._path, "encoding": ensemble_encoding(self.member), "write_initial_state": False,
                               **self.model.grib_output_options()}}
            self._output = create_output(self.model.runner, config, self.model.metadata)
        self._output.write_state(contiguous_fields(self._accumulate.process(state)))
        self.write_seconds += time.perf_counter() - started
        if self.on_step:
            self.on_step(hour)

    def _close_window(self) -> None:
        self._output.close()
        self._output = None
        _release_output_path(self._path)
        window = self._window
        messages = count_messages(self._path)
        LOG.info("[WINDOW] member %03d h%03d-%03d closed: %s (%d messages, %.1f MB)", self.member,
                 window.start, window.end, os.path.basename(self._path), messages, os.path.getsize(self._path) / 1e6)
        self.closed_windows.append(window)
        self._upload.complete(messages)  # the upload may now send its last chunk and finalize the object
