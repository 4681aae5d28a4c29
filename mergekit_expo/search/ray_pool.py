"""``--workers N`` / ``--ray-address ADDR``: candidates scored by a pool of Ray actors.

Each actor builds its own :class:`~mergekit_expo.search.evaluator.Evaluator` (an engine — vLLM
with its own tensor parallelism, or transformers — and the scorer) from the run's settings,
once, and scores whatever candidate it is given. The driver hands each candidate to an idle
actor and writes every row to ``results.jsonl`` itself, so the file stays the run's one
resumable record. An actor that dies is replaced and its candidate handed out again. Every
candidate samples with the run's seed, so the rows equal those of a serial run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

LOG = logging.getLogger("mergekit_expo")

MAX_RESTARTS = 3  # per candidate: a candidate that kills its actor again is a real failure


class PoolWorker:
    """One actor: the run's evaluator, built on first use from the driver's objects."""

    def __init__(self, settings, scorer, data, assignment, guard, need_mids: bool):
        from mergekit_expo.search.evaluator import Evaluator
        from mergekit_expo.search.merge_config import load_search_config

        search = load_search_config(settings.config)
        self.evaluator = Evaluator(settings, search, scorer, data, assignment=assignment,
                                   guard=guard, need_intermediates=need_mids)

    def measure(self, values) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        row = self.evaluator.measure(values)
        return row, time.perf_counter() - started


class Pool:
    """``workers`` actors on a Ray cluster (a local one unless ``ray_address``)."""

    def __init__(self, session):
        import ray

        settings = session.settings
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            if settings.ray_address is not None:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=settings.workers, include_dashboard=False,
                         log_to_driver=False)
        self.actor_class = ray.remote(num_cpus=1, num_gpus=settings.worker_gpus,
                                      max_restarts=0)(PoolWorker)
        self.arguments = (settings.model_copy(update={"progress": False}), session.scorer,
                          session.data, session.assignment, session.guard, session.need_mids)
        self.actors = [self._new_actor() for _ in range(settings.workers)]
        self.replaced = 0

    def _new_actor(self):
        return self.actor_class.remote(*self.arguments)

    def run(self, jobs: list[tuple[Any, Any]], record) -> None:
        """Score every ``(key, values)``; ``record(key, row, seconds)`` as each finishes."""
        import ray
        from ray.exceptions import RayActorError

        queue = deque((key, values, 0) for key, values in jobs)
        idle = deque(self.actors)
        running: dict[Any, tuple[Any, tuple]] = {}  # object ref → (actor, job)
        while queue or running:
            while queue and idle:
                actor, job = idle.popleft(), queue.popleft()
                running[actor.measure.remote(job[1])] = (actor, job)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(done[0])
            try:
                row, seconds = ray.get(done[0])
            except RayActorError as error:
                key, values, tries = job
                if tries >= MAX_RESTARTS:
                    raise RuntimeError(f"candidate {key} killed {tries + 1} Ray workers") from error
                LOG.warning("expo search: a Ray worker died (%s); replacing it and scoring "
                            "%s again", type(error).__name__, key)
                self.actors.remove(actor)
                actor = self._new_actor()
                self.actors.append(actor)
                self.replaced += 1
                queue.appendleft((key, values, tries + 1))
                idle.append(actor)
                continue
            idle.append(actor)
            record(job[0], row, seconds)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
