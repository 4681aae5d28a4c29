"""``--workers N`` / ``--ray-address ADDR``: candidates scored by a pool of Ray actors.

Each actor builds its own :class:`~mergekit_expo.search.evaluator.Evaluator` (an engine — vLLM
with its own tensor parallelism, or transformers — and the scorer) from the run's settings,
once, and scores whatever candidate it is given. Actors start as candidates need them, up to
N (a run with one candidate left builds one engine, not N). The driver hands each candidate to
an idle actor and writes every row to ``results.jsonl`` itself, so the file stays the run's one
resumable record. An actor that dies is replaced and its candidate handed out again; a
candidate that has killed ``MAX_RESTARTS + 1`` actors stops the run with a
:class:`WorkerCrashError` that names it. Every candidate samples with the run's seed, so each
row equals the serial run's row of the same candidate.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from mergekit_expo.errors import ExpoError
from mergekit_expo.search.results import candidate_text

LOG = logging.getLogger("mergekit_expo")

MAX_RESTARTS = 3  # per candidate: a candidate that kills its actor again is a real failure


class WorkerCrashError(ExpoError):
    """A candidate whose scoring ended the process of every Ray worker it was given to."""


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
    """Up to ``workers`` actors on a Ray cluster (a local one unless ``ray_address``)."""

    def __init__(self, session):
        import ray

        settings = session.settings
        self.started_ray = not ray.is_initialized()  # a caller's Ray is left as it was
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
        self.size = settings.workers
        self.actors: list = []  # started by run() as candidates need them
        self.replaced = 0
        self.results = session.results

    def _new_actor(self):
        actor = self.actor_class.remote(*self.arguments)
        self.actors.append(actor)
        return actor

    def run(self, jobs: list[tuple[dict[str, Any], Any]], record) -> None:
        """Score every ``(head, values)``; ``record(head, row, seconds)`` as each finishes."""
        import ray
        from ray.exceptions import RayActorError

        queue = deque((key, values, 0) for key, values in jobs)
        idle = deque(self.actors)
        running: dict[Any, tuple[Any, tuple]] = {}  # object ref → (actor, job)
        while queue or running:
            while queue and (idle or len(self.actors) < self.size):
                actor = idle.popleft() if idle else self._new_actor()
                job = queue.popleft()
                running[actor.measure.remote(job[1])] = (actor, job)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(done[0])
            try:
                row, seconds = ray.get(done[0])
            except RayActorError as error:
                key, values, tries = job
                if tries >= MAX_RESTARTS:
                    raise WorkerCrashError(
                        f"{candidate_text(key)} ended {tries + 1} Ray workers in turn (each "
                        "process exited while scoring it: out of memory, or a crash in the "
                        "engine or the scorer; see the workers' logs); change the grid or fix "
                        f"the scorer. {self.results.resume_note()}") from None
                LOG.warning("expo search: a Ray worker died (%s); replacing it and scoring "
                            "%s again", type(error).__name__, candidate_text(key))
                self.actors.remove(actor)  # its replacement starts when the job is handed out
                self.replaced += 1
                queue.appendleft((key, values, tries + 1))
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
