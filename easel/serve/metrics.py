"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library."""
from __future__ import annotations

import bisect
import threading

# Step latency buckets in seconds: a tiny model on a CPU takes milliseconds, SDXL on a CPU tens of seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FINISH_STATES = ("done", "failed", "cancelled")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters the job queue feeds; `render(queue)` adds the live gauges."""

    def __init__(self):
        self._lock = threading.Lock()
        self.n_submitted = self.n_started = self.n_rejected = self.n_images = 0
        self.n_finished = dict.fromkeys(FINISH_STATES, 0)
        self.bucket_counts = [0] * (len(STEP_BUCKETS) + 1)  # the last one is +Inf
        self.step_sum, self.step_count = 0.0, 0

    def submitted(self) -> None:
        """A job entered the queue."""
        with self._lock:
            self.n_submitted += 1

    def rejected(self) -> None:
        """A job was turned away because the queue was full."""
        with self._lock:
            self.n_rejected += 1

    def started(self) -> None:
        """A worker took a job."""
        with self._lock:
            self.n_started += 1

    def finished(self, state: str, n_images: int, ran: bool = True) -> None:
        """A job ended in `state` with `n_images` images."""
        with self._lock:
            self.n_finished[state] = self.n_finished.get(state, 0) + 1
            self.n_images += n_images

    def step(self, seconds: float) -> None:
        """One sampler step took `seconds` (wall clock between step callbacks)."""
        with self._lock:
            self.bucket_counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
            self.step_sum += seconds
            self.step_count += 1

    def render(self, queue=None) -> str:
        """All metrics as Prometheus text."""
        with self._lock:
            lines = _counter("easel_jobs_submitted_total", "Jobs accepted into the queue.", self.n_submitted)
            lines += _counter("easel_jobs_rejected_total", "Jobs refused because the queue was full.", self.n_rejected)
            lines += _counter("easel_jobs_started_total", "Jobs a worker started.", self.n_started)
            lines += ["# HELP easel_jobs_finished_total Jobs finished, by final state.",
                      "# TYPE easel_jobs_finished_total counter"]
            lines += [f'easel_jobs_finished_total{{state="{s}"}} {n}' for s, n in self.n_finished.items()]
            lines += _counter("easel_images_generated_total", "Images generated.", self.n_images)
            lines += self._histogram()
        if queue is not None:
            lines += _gauge("easel_jobs_queued", "Jobs waiting in the queue.", queue.queued())
            lines += _gauge("easel_jobs_running", "Jobs running now.", sum(j is not None for j in queue._running.values()))
            lines += _gauge("easel_queue_capacity", "Most jobs the queue holds.", queue.max_queued)
        return "\n".join(lines) + "\n"

    def _histogram(self) -> list[str]:
        name = "easel_step_seconds"
        out = [f"# HELP {name} Wall-clock seconds per sampler step.", f"# TYPE {name} histogram"]
        cumulative = 0
        for le, n in zip([*(f"{b:g}" for b in STEP_BUCKETS), "+Inf"], self.bucket_counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.step_sum:.6f}", f"{name}_count {self.step_count}"]
        return out


def _counter(name: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]


def _gauge(name: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
