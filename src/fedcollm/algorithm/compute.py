"""Heterogeneous compute: each client's local budget, its speed, and what a round deadline
does to it (issue 28). The one place that says how many steps a client takes in a round.

A client's budget is the `[client]` table's, or its profile's (`[[client.profiles]]`). With a
deadline D, a client that needs more than D seconds is late, and `client.late` says what
happens: "wait" for it, "drop" it (it sends nothing the server aggregates), or take its
"partial" work, the steps done by D. On the "simulated" clock a client's time is steps /
speed, known before it starts (deterministic, so a simulated run is reproducible); on the
"wall" clock (deployment) the client stops when D seconds have passed since it began.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcollm.config import Config, client_profile

ON_TIME, WAITED, PARTIAL, DROPPED = "on time", "late, waited for", "partial", "dropped"


@dataclass(frozen=True)
class Budget:
    """One client's local work per round and its speed (optimiser steps per second)."""

    local_epochs: int
    max_steps: int  # 0: no cap
    batch_size: int
    speed: float

    def planned_steps(self, num_examples: int) -> int:
        """The steps of the whole budget: E passes over D_k, capped by max_steps."""
        steps = self.local_epochs * math.ceil(num_examples / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps


def client_budget(config: Config, partition: int | None) -> Budget:
    """Client `partition`'s budget: its profile's, else (or for None) the [client] table's."""
    source = client_profile(config, partition) or config.client
    return Budget(source.local_epochs, source.max_steps, source.batch_size, source.speed)


def planned_steps(config: Config, split, partition: int) -> int:
    """The steps of client `partition`'s whole budget on its part of the server's split."""
    return client_budget(config, partition).planned_steps(len(split.clients[partition]))


@dataclass(frozen=True)
class Schedule:
    """What a client does this round: its steps, the seconds they take on the round's
    clock, and how the deadline treated it."""

    steps: int
    seconds: float
    outcome: str

    @property
    def contributes(self) -> bool:
        return self.outcome != DROPPED


def simulated_schedule(config: Config, budget: Budget, num_examples: int) -> Schedule:
    """The round on the simulated clock: known before the client starts."""
    planned = budget.planned_steps(num_examples)
    needed = planned / budget.speed
    deadline = config.client.deadline_s
    if not deadline or needed <= deadline:
        return Schedule(planned, needed, ON_TIME)
    if config.client.late == "wait":
        return Schedule(planned, needed, WAITED)
    done = math.floor(deadline * budget.speed)
    if config.client.late == "drop" or not done:  # nothing it does would arrive in time
        return Schedule(0, deadline, DROPPED)
    return Schedule(done, done / budget.speed, PARTIAL)


def wall_outcome(config: Config, planned: int, steps: int, seconds: float) -> str:
    """The outcome of a client that ran `steps` of its `planned` ones in `seconds` of real
    time (it stops at the deadline under "partial", keeps going otherwise)."""
    deadline = config.client.deadline_s
    if not deadline or seconds <= deadline:
        return ON_TIME
    if config.client.late == "wait":
        return WAITED
    if config.client.late == "drop" or not steps:
        return DROPPED
    return PARTIAL if steps < planned else ON_TIME  # its last step ended past the deadline


def round_plan(config: Config, partition: int, num_examples: int) -> tuple[Budget, Schedule]:
    """Client `partition`'s budget and what it will do this round: on the simulated clock
    known now, on the wall clock its whole budget until `finished` says otherwise."""
    budget = client_budget(config, partition)
    if config.client.clock == "wall":
        return budget, Schedule(budget.planned_steps(num_examples), 0.0, ON_TIME)
    return budget, simulated_schedule(config, budget, num_examples)


def wall_stop(config: Config) -> float:
    """Seconds after which a client stops training (0: it does not stop)."""
    wall = config.client.clock == "wall" and config.client.late == "partial"
    return config.client.deadline_s if wall else 0.0


def finished(config: Config, plan: Schedule, steps: int, seconds: float) -> Schedule:
    """What the client did: the plan on the simulated clock, its real steps and seconds on
    the wall clock."""
    if config.client.clock != "wall":
        return plan
    return Schedule(steps, seconds, wall_outcome(config, plan.steps, steps, seconds))
