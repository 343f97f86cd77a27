"""Generation ahead of training, with bounded staleness by construction (asynchronous RL).

The RL loop admits the first generation round of the next steps — at most ``depth`` (= K,
``rl.asynchronous.max_staleness``) steps ahead — and starts one background thread that generates
them, in step order, while the trainer updates. Before the weights are synced into the engine the
loop waits for that thread (``wait``), so the engine is idle during a sync, no sample spans two
weight versions, and cached prefixes are reset with their weights. A round generated while the
trainer was at version v is trained at step ``s`` >= v + 1, and since no more than K steps are ever
admitted ahead, its staleness ``s - v`` is at most K: nothing is discarded for being stale.

The queue holds plain data: ``pending()`` is what the resume state saves (the admitted steps and
their prompts; their groups are regenerated on resume), and ``take(step)`` hands the loop the
generated round of its step exactly once.

    ahead = Ahead(depth=1, generate=lambda step, uids: ...)   # generate: runs in the background thread
    ahead.admit(step + 1, uids)       # the loop draws the prompts (sampler state stays in the loop)
    ahead.start()                     # background generation, overlapping the update
    ... update ...
    waited = ahead.wait()             # seconds the trainer sat idle
    ... sync weights ...
    round_ = ahead.take(step + 1)     # at the next step
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Request:
    step: int
    uids: list[str]
    result: Any = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class Ahead:
    depth: int
    generate: Callable[[int, list[str]], Any]
    _queue: list[_Request] = field(default_factory=list)
    _thread: threading.Thread | None = None
    busy_seconds: float = 0.0  # background generation time since the last ``wait``

    def __len__(self) -> int:
        return len(self._queue)

    def admit(self, step: int, uids: list[str]) -> None:
        """Queue step ``step``'s first round; refused beyond ``depth`` steps or out of order."""
        if len(self._queue) >= self.depth:
            raise RuntimeError(
                f"ahead: {len(self._queue)} steps admitted already (max_staleness {self.depth})"
            )
        if self._queue and step <= self._queue[-1].step:
            raise RuntimeError(f"ahead: step {step} admitted after step {self._queue[-1].step}")
        self._queue.append(_Request(step, list(uids)))

    def next_step(self, current: int) -> int:
        """The step the next admission would be for."""
        return self._queue[-1].step + 1 if self._queue else current + 1

    def has(self, step: int) -> bool:
        return bool(self._queue) and self._queue[0].step == step

    def start(self) -> None:
        """Generate every admitted round not generated yet, in one background thread."""
        todo = [r for r in self._queue if not r.done]
        if not todo or self._thread is not None:
            return

        def work() -> None:
            t0 = time.perf_counter()
            for r in todo:
                try:
                    r.result = self.generate(r.step, r.uids)
                except BaseException as e:  # handed to the loop's thread in ``wait``
                    r.error = e
                    break
                finally:
                    r.done = True
            self.busy_seconds += time.perf_counter() - t0

        self._thread = threading.Thread(target=work, name="posttrain-ahead", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Block until the background generation is done; returns the seconds this call waited."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for r in self._queue:
            if r.error is not None:
                raise r.error
        return time.perf_counter() - t0

    def take(self, step: int) -> Any:
        """The generated round of ``step`` (generating it now if it is not yet), removed from the queue."""
        if not self.has(step):
            raise KeyError(f"ahead: step {step} was not admitted")
        if not self._queue[0].done:
            self.start()
            self.wait()
        r = self._queue.pop(0)
        if r.error is not None:
            raise r.error
        return r.result

    def pending(self) -> list[list[Any]]:
        """[[step, uids], …] of the admitted rounds not taken yet (saved with the resume state)."""
        return [[r.step, list(r.uids)] for r in self._queue]
