"""A sweep's units on a Ray cluster: actors each hold a :class:`~lens.sweep_worker.SweepWorker`
(a loaded model and its document KV, built once per actor or read from a shared ``--kv disk``
folder), the driver hands each idle actor the next unit and writes every finished unit's part
itself, so the records folder is exactly a single-process sweep's.

An actor that dies is restarted and its unit rerun (``max_restarts`` / ``max_task_retries``);
a driver that dies leaves committed parts that the same command, with or without Ray, resumes.
Imported only by ``lens sweep --ray``: without it nothing here (and not Ray) is loaded.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from lens.errors import LensError
from lens.sweep_worker import SweepWorker

RESTARTS = 3  # how often an actor that died is restarted (its unit rerun) before the sweep gives up


class SweepActor:
    """A worker on an actor.  A refusal at start (other data or weights than the driver's) is kept
    and raised by each call: a task error, reported as it is, rather than an actor that dies and
    is restarted in vain."""

    def __init__(self, *args):
        try:
            self.worker, self.error = SweepWorker(*args), None
        except LensError as err:
            self.worker, self.error = None, str(err)

    def call(self, method: str, *args):
        if self.error:
            raise LensError(self.error)
        return getattr(self.worker, method)(*args)


def _ray():
    try:
        import ray
    except ImportError:
        raise LensError("--ray needs Ray: pip install 'lens[ray]' (or pip install ray)") from None
    return ray


class RayUnits:
    """The units of one sweep on Ray; ``address``: ``local`` starts a cluster on this machine,
    anything else is passed to ``ray.init`` (``auto``, ``HOST:6379``, ``ray://HOST:10001``)."""

    def __init__(self, cfg, address: str, workers: int | None = None, threads: int | None = None):
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: no accelerator variables to keep
        ray = self.ray = _ray()
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
                else:
                    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise LensError(f"--ray {address}: cannot reach a Ray cluster ({err}); start one "
                                "(`ray start --head`) or pass --ray local") from None
        # the thread count is part of a unit's bits: every actor uses the driver's
        self.threads = threads or torch.get_num_threads()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = min(workers or max(1, cpus // self.threads), cpus)
        # one logical CPU each, so `workers` actors always fit the cluster (a pending actor would hold its unit)
        actor = ray.remote(num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)(SweepActor)
        self.actors = [actor.remote(cfg, None, False, self.threads, True) for _ in range(count)]

    def _get(self, ref):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, LensError):
                raise LensError(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as err:
            raise LensError(f"a Ray worker died {RESTARTS + 1} times running a unit ({type(err).__name__}); "
                            "see its log (`ray logs`), then rerun the same command to resume") from None

    def check(self, units: list[tuple[int, list[str]]]) -> dict:
        return self._get(self.actors[0].call.remote("check", units))

    def run(self, todo: list[tuple[int, int, list[str]]]) -> Iterator[tuple[tuple[int, int], object, dict]]:
        """Each unit's frame and timing as it finishes (any order); each idle actor takes the next unit."""
        queue, idle, pending = list(todo), list(self.actors), {}
        while queue or pending:
            while queue and idle:
                actor = idle.pop(0)
                n, b, query_ids = queue.pop(0)
                pending[actor.call.remote("run_timed", n, query_ids)] = (actor, (n, b))
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            actor, unit = pending.pop(ready[0])
            frame, timing = self._get(ready[0])
            idle.append(actor)
            yield unit, frame, timing

    def baseline(self, query_ids: list[str], sizes: list[int]):
        return self._get(self.actors[0].call.remote("baseline", query_ids, sizes, False))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
