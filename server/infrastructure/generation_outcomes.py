"""Wakes callers waiting for a generation's outcome when the projector sees it final.

In cluster mode the replica that records an outcome need not be the one a client asked, but
every replica projects the shared event log, so the projection is where all of them learn
of it. Implements the application's GenerationOutcomes port."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from server.domain.generation import FINAL_STATES
from server.infrastructure.read_model import ProjectedChange


class ProjectedOutcomes:
    def __init__(self, remember: int = 10_000) -> None:
        self._remember = remember
        # Finished ids seen lately, so a wait that starts after the projection still returns.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()

    def on_change(self, change: ProjectedChange) -> None:
        finished = [v.id for v in change.generations if v.state in FINAL_STATES]
        if not finished:
            return
        with self._cond:
            for gid in finished:
                self._finished[gid] = None
                self._finished.move_to_end(gid)
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)
            self._cond.notify_all()

    def wait_finished(self, generation_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while generation_id not in self._finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True
