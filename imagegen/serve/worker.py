"""The model worker of `imagegen serve`: one thread for model work (torch parallelises each call over the
cores), a cap of MAX_PENDING admitted requests (the next one is refused at once with Busy, a 503 with
Retry-After), a deadline of DEADLINE_S for each, and micro-batches: concurrent /api/generate requests for
the same model and options are gathered into one call, which changes no pixel because an image depends
only on its seed, whatever the batch it is drawn in (models/base.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

MAX_PENDING = 32                # requests admitted at once (queued or running); more get 503
MAX_BATCH = 64                  # images per micro-batched call
BATCH_WAIT_S = 0.001            # a batch waits this long for requests on their way (8 clients: p50 16 ms, not 20)
DEADLINE_S = 30.0               # a request not answered by then gets 503 (its work is dropped if not started)
RETRY_AFTER_S = 1


class Busy(Exception):
    pass


class Late(asyncio.TimeoutError):
    """Raised in the model thread at a network call made after the request's deadline: its answer (503)
    has gone, so the rest of its work is dropped instead of holding the one model thread. The model
    thread's clock starts before the request's asyncio.wait_for does, so this can reach the request
    before wait_for's own timeout; it is that same timeout, hence the subclass and the same 503."""


_due = threading.local()   # the deadline of the work the model thread runs now (time.monotonic())


def stop_if_late(module, args) -> None:
    """A forward pre-hook on every served network (common.load_served): the work stops at the first
    network call past its deadline. Sampling calls the network once per step, so a 100-step request
    stops within one step of it."""
    due = getattr(_due, "at", None)
    if due is not None and time.monotonic() > due:
        raise Late()


def until(due: float, fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, run in the model thread with its deadline known to stop_if_late."""
    def run():
        _due.at = due
        try:
            return fn()
        finally:
            _due.at = None
    return run


# --- admission, deadline and micro-batching -------------------------------------------------------------

class Worker:
    """One thread for model work, a cap on admitted requests, and micro-batches of generate calls."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagegen-model")
        self.pending = 0
        self.queues: dict[Any, list] = {}
        self.draining: set = set()              # keys whose drain task is running
        self.tasks: set = set()

    def admit(self) -> None:
        if self.pending >= MAX_PENDING:
            raise Busy()
        self.pending += 1

    async def call(self, fn: Callable[[], Any]) -> Any:
        """fn() in the model thread, under admission and the deadline."""
        self.admit()
        due = time.monotonic() + DEADLINE_S
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.executor, until(due, fn)), DEADLINE_S)
        finally:
            self.pending -= 1

    async def batched(self, key: Any, work: Callable[[list], list], item: Any) -> Any:
        """work([items]) -> [results], with the items of concurrent requests that share `key` gathered
        into one call: while one call runs, new requests queue, and the next call takes them all."""
        self.admit()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.queues.setdefault(key, []).append((item, future, time.monotonic() + DEADLINE_S))
            if key not in self.draining:
                self.draining.add(key)
                task = loop.create_task(self._drain(key, work))
                self.tasks.add(task)                    # asyncio keeps only weak references to tasks
                task.add_done_callback(self.tasks.discard)
            return await asyncio.wait_for(future, DEADLINE_S)
        finally:
            self.pending -= 1

    async def _drain(self, key: Any, work: Callable[[list], list]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._drain_queue(key, work, loop)
        finally:
            self.draining.discard(key)
            if not self.queues.get(key):
                self.queues.pop(key, None)

    async def _drain_queue(self, key: Any, work: Callable[[list], list], loop) -> None:
        while self.queues.get(key):
            queue = self.queues[key]
            if len(queue) < MAX_BATCH:
                await asyncio.sleep(BATCH_WAIT_S)   # let the clients just answered send their next requests
            jobs, size = [], 0
            while queue and (not jobs or size + queue[0][0].size <= MAX_BATCH):
                job = queue.pop(0)
                if not job[1].done():               # a request past its deadline is dropped, not computed
                    jobs.append(job)
                    size += job[0].size
            if not jobs:
                continue
            due = max(d for _, _, d in jobs)        # the batch runs while one of its requests still waits
            try:
                results = await loop.run_in_executor(self.executor, until(due, lambda: work([item for item, _, _ in jobs])))
                for (_, fut, _), result in zip(jobs, results):
                    if not fut.done():
                        fut.set_result(result)
            except Exception as e:                  # the library's typed errors reach each request
                for _, fut, _ in jobs:
                    if not fut.done():
                        fut.set_exception(e)
            await asyncio.sleep(0)                  # let requests that arrived meanwhile join the queue


@dataclass
class GenItem:
    seeds: list[int]
    labels: torch.Tensor | None

    @property
    def size(self) -> int:
        return len(self.seeds)
