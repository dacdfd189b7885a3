"""Fetch Hub shards ahead of `apply`, in the order the engine reads them, within a disk budget.

The engine walks the new base's tensors in on-disk order; each job reads one shard of the new base and
one of each post/base (or delta) input. That order fixes when every Hub shard is first needed and when
it is last needed. One downloader thread fetches shards by first need into the huggingface_hub cache;
a job waits only for the shards it reads (Checkpoint -> ShardSource.wait -> Stream.wait). With a budget
(`--max-cache`), a download waits for room, and a shard this run downloaded is deleted as soon as the
engine has started a job past its last use; shards that were cached before the run are left alone.

>>> with stream(plan, budget=40 * 10**9) as on_job:                   # doctest: +SKIP
...     run_plan(plan, writer, on_job=on_job)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import OptionError
from .plan import Plan, job_reads


@contextmanager
def stream(plan: Plan, budget: int | None, progress: bool = True) -> Iterator[object]:
    """Yield run_plan's `on_job` callback while shards download; None when every input is local."""
    s = Stream(plan, budget, progress)
    if not s.files:
        yield None
        return
    s.start()
    try:
        yield s.job_started
        s.finished = True
    finally:
        s.close()


class Stream:
    """The download plan of one `apply` run, its downloader thread, and the shards it may delete."""

    def __init__(self, plan: Plan, budget: int | None, progress: bool = True):
        self.budget, self.progress = budget, progress
        self.first: dict[Path, int] = {}  # shard -> first job that reads it (insertion order = download order)
        self.last: dict[Path, int] = {}
        self.readers: dict[Path, list[Checkpoint]] = {}  # checkpoints that hold it open (released on delete)
        for j, job in enumerate(plan.jobs):
            for ck, name in job_reads(plan, job):
                if ck.remote is None:
                    continue
                f = ck.tensors[name].file
                self.first.setdefault(f, j)
                self.last[f] = j
                if ck not in self.readers.setdefault(f, []):
                    self.readers[f].append(ck)
        self.files = [f for f in self.first if not f.exists()]  # to download, by first need
        self.size = {f: self.readers[f][0].remote.size(f.name) for f in self.files}
        self.done = {f: threading.Event() for f in self.files}
        self.owned: list[Path] = []  # downloaded by this run and still on disk
        self.used = 0  # bytes of `owned`, plus the one downloading
        self.error: BaseException | None = None
        self.stopped = self.finished = False
        self.cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="pdelta-hub-download", daemon=True)
        if budget is not None:
            self._check_budget(plan, budget)

    def _check_budget(self, plan: Plan, budget: int) -> None:
        """Refuse, before any download, a budget smaller than the shards one job needs on disk at once."""
        peak, at = 0, 0
        for j in range(len(plan.jobs)):
            live = sum(self.size[f] for f in self.files if self.first[f] <= j <= self.last[f])
            if live > peak:
                peak, at = live, j
        if peak > budget:
            raise OptionError(f"--max-cache {budget:,} bytes is below the {peak:,} bytes of Hub shards this run needs "
                              f"on disk at once (at tensor {plan.jobs[at].out.name!r})",
                              hint=f"use --max-cache {-(-peak // 10**6)}MB or more")

    def start(self) -> None:
        for f in self.first:
            for ck in self.readers[f]:
                ck.remote.stream = self
        self._thread.start()

    def _run(self) -> None:
        for f in self.files:
            with self.cond:
                while not self.stopped and self.budget is not None and self.used + self.size[f] > self.budget:
                    self.cond.wait()
                if self.stopped:
                    return
                self.used += self.size[f]
            try:
                self.readers[f][0].remote.fetch(f, self.progress)
            except BaseException as e:  # noqa: BLE001 - handed to the engine thread, which raises it
                self.error = e
                for ev in self.done.values():
                    ev.set()
                return
            with self.cond:
                self.owned.append(f)
                late = self.stopped  # the run ended while this one downloaded
            self.done[f].set()
            if late and self.budget is not None:
                self._delete(f)

    def wait(self, file: Path) -> bool:
        """Block until `file` is on disk (engine thread, via ShardSource.wait); False if it is not planned."""
        ev = self.done.get(file)
        if ev is None:
            return False
        ev.wait()
        if self.error is not None and not file.exists():
            raise self.error
        return True

    def job_started(self, j: int) -> None:
        """Job j starts, so every job before it is done: with a budget, delete shards last read before j."""
        if self.budget is None:
            return
        with self.cond:
            finished = [f for f in self.owned if self.last[f] < j]
        for f in finished:
            self._delete(f)

    def _delete(self, f: Path) -> None:
        with self.cond:
            if f not in self.owned:
                return
            self.owned.remove(f)
        for ck in self.readers[f]:
            ck.release(f)
        blob = f.resolve()
        f.unlink(missing_ok=True)
        if blob != f and not _linked_elsewhere(blob):
            blob.unlink(missing_ok=True)
        with self.cond:
            self.used -= self.size[f]
            self.cond.notify_all()

    def close(self) -> None:
        """Stop downloading; with a budget, delete what this run downloaded (it is done with all of it)."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for f in self.first:
            for ck in self.readers[f]:
                ck.remote.stream = None
        if self.budget is not None:
            if self.finished:
                self._thread.join()
            for f in list(self.owned):
                self._delete(f)


def _linked_elsewhere(blob: Path) -> bool:
    """Whether another snapshot in the same cached repo still points at `blob` (same file, two commits)."""
    snapshots = blob.parent.parent / "snapshots"
    for root, _, names in os.walk(snapshots):
        for n in names:
            p = Path(root) / n
            if p.is_symlink() and p.resolve() == blob:
                return True
    return False
