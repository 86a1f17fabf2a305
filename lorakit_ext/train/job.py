"""A background job: one function run on a thread, with progress events, stop-and-save, cancel and a result.

The job knows nothing about training. It runs ``work(report, token)``: the work calls ``report(...)`` as it goes
and checks ``token`` between steps (``token.stop_requested``: finish early and save; ``token.raise_if_cancelled()``:
abandon). The training run, the copier/difference sliders and merges are all such functions, so the WebUI, the CLI
and the HTTP API follow every one of them the same way: subscribe to events, or poll with a cursor.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lorakit_ext.errors import LorakitError

JobStatus = Literal["pending", "running", "done", "stopped", "cancelled", "failed"]
FINISHED: tuple[str, ...] = ("done", "stopped", "cancelled", "failed")
RATE_SMOOTHING = 0.1  # weight of the newest step in the it/s average


class Cancelled(Exception):
    """Raised inside the work by ``StopToken.raise_if_cancelled`` when the job was cancelled."""


class StopToken:
    """What the work checks between steps; set by the job's ``stop()``/``cancel()`` from any thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._cancel = threading.Event()

    @property
    def stop_requested(self) -> bool:
        """True after ``stop()`` or ``cancel()``: the work should end at the next step boundary."""
        return self._stop.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def stop(self) -> None:
        self._stop.set()

    def cancel(self) -> None:
        self._cancel.set()
        self._stop.set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()


@dataclass(frozen=True)
class ProgressEvent:
    """One report from the work. ``values`` holds the work's own numbers (epoch, loss, smoothed loss, lr, ...);
    ``files`` and ``images`` list what was newly written; the job adds ``it_per_s``, ``eta_s`` and ``elapsed_s``."""

    index: int = 0  # position in the job's event list (the polling cursor)
    step: int = 0
    total: int = 0
    message: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    it_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0


Reporter = Callable[..., None]  # report(step=, total=, message=, values=, files=, images=)
Work = Callable[[Reporter, StopToken], Any]


class Job:
    """Runs ``work`` once on a daemon thread. Thread-safe: every method may be called from any thread."""

    def __init__(self, work: Work, name: str = "job"):
        self.name = name
        self._work = work
        self.token = StopToken()
        self._lock = threading.Lock()
        self._events: list[ProgressEvent] = []
        self._subscribers: list[Callable[[ProgressEvent], None]] = []
        self._status: JobStatus = "pending"
        self._result: Any = None
        self._error: str | None = None
        self._traceback: str | None = None
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._started_at = 0.0
        self._rate: float | None = None
        self._last_step: tuple[int, float] | None = None

    # --- control --------------------------------------------------------------------------------------------------

    def start(self) -> Job:
        with self._lock:
            if self._thread is not None:
                raise LorakitError(f"{self.name}: already started")
            self._status = "running"
            self._started_at = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"lorakit-{self.name}", daemon=True)
        self._thread.start()
        return self

    def run_here(self) -> Any:
        """Run in the calling thread (CLIs): the same events and outcome as ``start`` + ``wait``; returns the result
        and raises a failure as ``LorakitError``."""
        with self._lock:
            if self._thread is not None or self._status != "pending":
                raise LorakitError(f"{self.name}: already started")
            self._status = "running"
            self._started_at = time.monotonic()
        self._run()
        if self._status == "failed":
            raise LorakitError(self._error or f"{self.name} failed")
        return self._result

    def stop(self) -> None:
        """Ask the work to end at the next step and save what it has (it then finishes as "stopped")."""
        self.token.stop()

    def cancel(self) -> None:
        """Ask the work to end at the next step without saving (it then finishes as "cancelled")."""
        self.token.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finishes; False when ``timeout`` passed first."""
        return self._finished.wait(timeout)

    # --- observation ----------------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[ProgressEvent], None]) -> None:
        """Call ``callback(event)`` for each new event, on the job's thread (keep it quick; errors are ignored)."""
        with self._lock:
            self._subscribers.append(callback)

    def poll(self, since: int = 0) -> list[ProgressEvent]:
        """Events from index ``since`` on (pass the last index seen + 1 to get only new ones)."""
        with self._lock:
            return self._events[since:]

    @property
    def latest(self) -> ProgressEvent | None:
        with self._lock:
            return self._events[-1] if self._events else None

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def result(self) -> Any:
        return self._result

    @property
    def error(self) -> str | None:
        """The one-line message of the exception that failed the job."""
        return self._error

    @property
    def traceback(self) -> str | None:
        """The full traceback of an unexpected (non-``LorakitError``) failure, for logs."""
        return self._traceback

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready status for the UI and the HTTP API."""
        latest = self.latest
        return {
            "name": self.name,
            "status": self._status,
            "error": self._error,
            "events": len(self._events),
            "latest": None if latest is None else asdict(latest),
        }

    # --- running --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            result = self._work(self._report, self.token)
            with self._lock:
                if self.token.cancel_requested:  # a cancelled job has no result, even if the work returned one
                    self._status = "cancelled"
                else:
                    self._result, self._status = result, "stopped" if self.token.stop_requested else "done"
        except Cancelled:
            with self._lock:
                self._status = "cancelled"
        except LorakitError as error:
            with self._lock:
                self._status, self._error = "failed", str(error)
        except Exception as error:  # the job must end with a status whatever the work raises
            with self._lock:
                self._status = "failed"
                self._error = f"{type(error).__name__}: {error}".splitlines()[0]
                self._traceback = traceback.format_exc()
        finally:
            self._finished.set()

    def _report(
        self,
        step: int = 0,
        total: int = 0,
        message: str = "",
        values: dict[str, Any] | None = None,
        files: tuple[str, ...] | list[str] = (),
        images: tuple[str, ...] | list[str] = (),
    ) -> None:
        now = time.monotonic()
        with self._lock:
            self._update_rate(step, now)
            eta = (total - step) / self._rate if self._rate and total >= step else None
            event = ProgressEvent(
                index=len(self._events),
                step=step,
                total=total,
                message=message,
                values=dict(values or {}),
                files=tuple(str(f) for f in files),
                images=tuple(str(i) for i in images),
                it_per_s=self._rate,
                eta_s=eta,
                elapsed_s=now - self._started_at,
            )
            self._events.append(event)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # a broken UI callback must not kill the work
                pass

    def _update_rate(self, step: int, now: float) -> None:
        """Smoothed steps per second from the step counter (the first report after a resume only sets the origin)."""
        if self._last_step is not None and step > self._last_step[0] and now > self._last_step[1]:
            rate = (step - self._last_step[0]) / (now - self._last_step[1])
            self._rate = rate if self._rate is None else (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * rate
        if self._last_step is None or step != self._last_step[0]:
            self._last_step = (step, now)

