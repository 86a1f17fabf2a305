"""``JobManager``: one job at a time per host, tracked by id, followed the same way by the tabs and the HTTP API.

A job is an ``Operation`` (what to run, whether it needs the loaded model) wrapped in the core's ``Job``. The
manager adds what every front end needs around it: the host's exclusive session (queue lock, model restore),
mirroring progress into the host's own display, the host's Interrupt, and a one-line result.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.job import FINISHED, Job, ProgressEvent, StopToken
from lorakit_ext.ui.host import Host, ProgressView

# run(adapter, report, token) -> a JSON-ready result dict with at least "files" (list of written paths)
OperationRun = Callable[[Any, Callable[..., None], StopToken], dict]
KEPT_JOBS = 32  # finished jobs remembered for GET jobs/{id}


class Busy(LorakitError):
    """Another job is running (the HTTP API answers 409)."""


class UnknownJob(LorakitError):
    """No job has this id (the HTTP API answers 404)."""


@dataclass(frozen=True)
class Operation:
    """One unit of work a front end asks for, built and validated before anything runs."""

    kind: str  # "train", "copier", "difference", "merge", ...
    title: str  # one line shown while it runs: "train lora 'my_style'"
    run: OperationRun
    needs_model: bool


@dataclass
class JobRecord:
    id: str
    operation: Operation
    job: Job
    submitted_at: float = field(default_factory=time.time)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready progress and outcome (GET jobs/{id})."""
        latest = self.job.latest
        return {
            "id": self.id,
            "kind": self.operation.kind,
            "title": self.operation.title,
            "status": self.job.status,
            "error": self.job.error,
            "progress": progress_view(latest).__dict__ if latest else None,
            "result": self.job.result if self.job.status in ("done", "stopped") else None,
            "result_line": result_line(self),
        }


def progress_view(event: ProgressEvent) -> ProgressView:
    """The one line every front end shows for an event: step, epoch, loss, lr, speed."""
    values = event.values
    parts = [f"step {event.step}/{event.total}"] if event.total else []
    if "epoch" in values:
        parts.append(f"epoch {values['epoch']}/{values['epochs']}")
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f} (avg {values.get('avg_loss', values['loss']):.4f})")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if event.it_per_s:
        parts.append(f"{event.it_per_s:.2f} it/s")
    if event.eta_s is not None:
        parts.append(f"eta {event.eta_s:.0f}s")
    if event.message and "loss" not in values:
        parts.append(event.message)
    fraction = min(event.step / event.total, 1.0) if event.total else 0.0
    return ProgressView(fraction=fraction, text=", ".join(parts), step=event.step, total=event.total)


def result_line(record: JobRecord) -> str:
    """How a finished job ends in every front end: the file, its hash and the time taken, or the error."""
    job = record.job
    if job.status not in FINISHED:
        return ""
    if job.status == "failed":
        return f"Error: {job.error}"
    if job.status == "cancelled":
        return "Cancelled: nothing was saved."
    result = job.result or {}
    seconds = result.get("seconds", 0.0)
    output = result.get("output")
    saved = f"Saved {output} (hash {result.get('hash', '?')})" if output else "Nothing saved"
    stopped = "Stopped early. " if job.status == "stopped" else ""
    warnings = "".join(f" Warning: {w}" for w in result.get("warnings") or [])
    return f"{stopped}{saved} in {seconds:.1f} s.{warnings}"


class JobManager:
    """Runs at most one ``Operation`` at a time on ``host``; remembers recent jobs by id. Thread-safe."""

    def __init__(self, host: Host):
        self.host = host
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}

    def submit(self, operation: Operation, task_id: str | None = None) -> JobRecord:
        """Start ``operation`` in the background; ``Busy`` when a job is running. ``task_id`` is the WebUI's
        ``id_task`` when the click came from its page (so its progress bar follows this job)."""
        with self._lock:
            running = self.running()
            if running is not None:
                raise Busy(f"{running.operation.title} is running (job {running.id}); wait for it or stop it")
            job_id = task_id or f"task({uuid.uuid4().hex[:15]})"
            record = JobRecord(job_id, operation, Job(self._work(job_id, operation), name=operation.kind))
            self._records[job_id] = record
            self._forget_old()
            record.job.subscribe(lambda event: self._mirror(record, event))
            record.job.start()
        return record

    def get(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        return record

    def records(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.submitted_at)

    def running(self) -> JobRecord | None:
        return next((r for r in self._records.values() if r.job.status not in FINISHED), None)

    def stop(self, job_id: str, cancel: bool = False) -> JobRecord:
        """Stop (save what there is) or cancel (save nothing) a job; finished jobs are left as they are."""
        record = self.get(job_id)
        record.job.cancel() if cancel else record.job.stop()
        return record

    def _work(self, job_id: str, operation: Operation):
        def work(report, token: StopToken) -> dict:
            started = time.perf_counter()
            report(message=f"waiting for the host: {operation.title}")
            with self.host.job_session(job_id, operation.title, operation.needs_model) as adapter:
                report(message=f"started: {operation.title}")
                result = operation.run(adapter, report, token)
            if result.get("files"):
                self.host.refresh_networks()
            return {**result, "seconds": round(time.perf_counter() - started, 3)}

        return work

    def _mirror(self, record: JobRecord, event: ProgressEvent) -> None:
        """Each event into the host's display; the host's own Interrupt stops the job (and saves)."""
        preview = None
        if event.images:
            from PIL import Image

            preview = Image.open(event.images[-1])
        self.host.report(record.id, progress_view(event), preview)
        if self.host.interrupted():
            record.job.stop()

    def _forget_old(self) -> None:
        finished = [key for key, r in self._records.items() if r.job.status in FINISHED]
        for key in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self._records[key]
