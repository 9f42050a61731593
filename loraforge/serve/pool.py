"""Scheduling generation requests onto the one model.

Two strategies, chosen by `ServerConfig.scheduling` (measured in docs/SERVING.md):

- `lock`: each request runs `InferenceModel.generate` on its own (in a worker thread); the model lock makes
  them take turns. Simple; throughput is one request at a time.
- `batch`: requests wait in a queue; a single scheduler thread takes whatever is waiting (up to
  `max_batch_size`, after a `batch_window_ms` pause for stragglers) and generates it as ONE left-padded batch
  in which every row carries its own adapter (PEFT `adapter_names`). Rows are grouped only when their
  sampling settings match, since one `generate` call has one set of settings.

Either way a request's adapter is fixed per row, so it never sees another request's adapter.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loraforge.inference import GenerationResult, GenerationSettings, InferenceModel, PromptLike

log = logging.getLogger("loraforge.serve")


@dataclass
class _Job:
    prompt: PromptLike
    adapter: str
    settings: GenerationSettings
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        s = self.settings
        # A seeded request runs alone: its random stream must not depend on its neighbours.
        solo = id(self) if s.seed is not None else None
        return (s.max_new_tokens, s.temperature, s.top_p, tuple(s.stop), solo)


class GenerationPool:
    """Runs generation off the event loop with the configured strategy. `start()` before use, `stop()` after."""

    def __init__(self, model: InferenceModel, *, scheduling: str = "batch", max_batch_size: int = 16,
                 batch_window_ms: float = 5.0):
        self.model = model
        self.scheduling = scheduling
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0  # counters for the benchmark / logs
        self.rows = 0

    def start(self) -> None:
        if self.scheduling == "batch" and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="loraforge-batcher")
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=120)
            self._thread = None

    async def generate(self, prompts: list[PromptLike], adapter: str, settings: GenerationSettings) -> list[GenerationResult]:
        """Generate one result per prompt with `adapter`, without blocking the event loop."""
        if self.scheduling == "lock":
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(self.model.generate_batch, prompts, adapter, settings)
        jobs = [_Job(p, adapter, settings) for p in prompts]
        for job in jobs:
            self._queue.put(job)
        return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))

    def generate_sync(self, prompt: PromptLike, adapter: str, settings: GenerationSettings) -> GenerationResult:
        """Blocking variant (for scripts and tests that have no event loop)."""
        if self.scheduling == "lock":
            return self.model.generate(prompt, adapter, settings)
        job = _Job(prompt, adapter, settings)
        self._queue.put(job)
        return job.future.result()

    # --- the batch scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.batch_window
            stop = False
            while len(jobs) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key(), []).append(job)
            for group in groups.values():
                self._run(group)
            if stop:
                return

    def _run(self, group: list[_Job]) -> None:
        live = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.model.generate_batch([j.prompt for j in live], [j.adapter for j in live], live[0].settings)
        except BaseException as err:  # noqa: BLE001 - delivered to each waiting request
            if len(live) > 1:
                # One bad row (e.g. an adapter unloaded while queued) must not fail its neighbours.
                for job in live:
                    self._run_one(job)
                return
            live[0].future.set_exception(err)
            return
        self.batches += 1
        self.rows += len(live)
        for job, result in zip(live, results):
            job.future.set_result(result)

    def _run_one(self, job: _Job) -> None:
        try:
            job.future.set_result(self.model.generate(job.prompt, job.adapter, job.settings))
        except BaseException as err:  # noqa: BLE001
            job.future.set_exception(err)

    def stats(self) -> dict[str, Any]:
        return {"scheduling": self.scheduling, "batches": self.batches, "rows": self.rows,
                "mean_batch": round(self.rows / self.batches, 2) if self.batches else None}
