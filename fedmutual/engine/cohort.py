"""Client work on cohorts: the one mutual-learning training loop.

An algorithm describes, for each participating client, which models train
together (the *members*), with which loss weights, on which data. The engine
runs the whole cohort of such jobs. Every algorithm trains through
:func:`run_cohort`; FedAvg is a cohort of one model per client, FML of two.

The job types and the plain loop live in :mod:`fedmutual.engine.jobs`, the
stacked engine in :mod:`fedmutual.engine.stacked`; this module dispatches
between them and is where the rest of the package imports the job API from.
"""

from __future__ import annotations

from typing import Callable, Sequence

from fedmutual.engine.jobs import (
    ClientJob, JobResult, Member, accuracy, batch_order, count_steps, prox_term, sgd, train_job,
)
from fedmutual.engine.phases import phase
from fedmutual.engine.stacked import run_cohort_stacked

__all__ = [
    "ClientJob", "JobResult", "Member", "accuracy", "batch_order", "count_steps", "prox_term", "run_cohort", "sgd",
    "train_job",
]


def run_cohort(
    jobs: Sequence[ClientJob], round: int, on_step: Callable[[], None] | None = None, engine: str = "auto"
) -> list[JobResult]:
    """Train every job of the cohort; returns one result per job, in order.

    ``engine`` is ``"loop"`` (:func:`train_job` per job), ``"stacked"`` (every job
    that can be stacked runs stacked) or ``"auto"`` (stacked where that is
    faster). Both give the same results up to floating-point rounding; see
    :mod:`fedmutual.engine.stacked`. ``on_step`` is called once per client step.
    """
    with phase("train"):
        if engine == "loop":
            return [train_job(job, round, on_step) for job in jobs]
        return run_cohort_stacked(jobs, round, on_step, engine)
