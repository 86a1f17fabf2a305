"""The generic background job: events, stop-and-save, cancel, errors, thread safety."""

from __future__ import annotations

import threading
import time

import pytest

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.job import Job


def _counting_work(steps: int, gate: threading.Event | None = None):
    def work(report, token):
        done = 0
        for step in range(1, steps + 1):
            if token.stop_requested:
                break
            token.raise_if_cancelled()
            if gate is not None:
                gate.wait()
            time.sleep(0.002)
            done = step
            report(step=step, total=steps, values={"loss": 1.0 / step}, files=[f"f{step}"] if step % 5 == 0 else [])
        return {"saved_at": done}

    return work


def test_events_reach_subscribers_and_pollers():
    job = Job(_counting_work(20), "count")
    seen = []
    job.subscribe(seen.append)
    job.start()
    assert job.wait(10)
    assert job.status == "done" and job.result == {"saved_at": 20}
    events = job.poll()
    assert [e.step for e in events] == list(range(1, 21)) and seen == events
    assert [e.index for e in events] == list(range(20))
    assert job.poll(18) == events[18:]
    assert events[4].files == ("f5",) and events[-1].values["loss"] == pytest.approx(0.05)
    assert events[-1].it_per_s > 0 and events[-1].eta_s == pytest.approx(0.0)
    assert job.snapshot()["latest"]["step"] == 20


def test_stop_ends_at_a_step_with_the_result_and_cancel_without():
    gate = threading.Event()
    job = Job(_counting_work(1000, gate)).start()
    gate.set()
    while not job.poll():
        time.sleep(0.001)
    job.stop()
    assert job.wait(10) and job.status == "stopped"
    assert 1 <= job.result["saved_at"] < 1000
    job = Job(_counting_work(1000)).start()
    job.cancel()
    assert job.wait(10) and job.status == "cancelled" and job.result is None


def test_failures_become_one_line_errors():
    def bad_input(report, token):
        raise LorakitError("train_data_dir x: no images")

    def bug(report, token):
        raise ValueError("boom\nsecond line")

    job = Job(bad_input).start()
    job.wait(10)
    assert (job.status, job.error, job.traceback) == ("failed", "train_data_dir x: no images", None)
    job = Job(bug).start()
    job.wait(10)
    assert job.status == "failed" and job.error == "ValueError: boom" and "Traceback" in job.traceback
    with pytest.raises(LorakitError, match="no images"):
        Job(bad_input).run_here()
    job = Job(_counting_work(3))
    assert job.run_here() == {"saved_at": 3} and job.status == "done" and len(job.poll()) == 3


def test_a_broken_subscriber_does_not_break_the_work():
    job = Job(_counting_work(3))
    job.subscribe(lambda event: 1 / 0)
    job.start()
    job.wait(10)
    assert job.status == "done" and len(job.poll()) == 3
    with pytest.raises(LorakitError, match="already started"):
        job.start()
