"""Claims queued work, runs it on a backend, records the outcome, expires and recovers."""

from backburner.scheduler.worker import Worker, WorkerOptions

__all__ = ["Worker", "WorkerOptions"]
