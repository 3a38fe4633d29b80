"""The paper's comparison: every method with the same models, data split, seeds and budget.

A method is one row of the table `METHODS` (`register_method(Method(...))` at the end of
this file): its name, its row in Table 1, how it runs, what it scores, and which of the
paper's comparisons it carries. The report, the significance tests and the plots read it
there; a new method is one registration.

| method      | what is trained                         | scored                           |
| ----------- | --------------------------------------- | -------------------------------- |
| zero-shot   | nothing                                 | LLM, SLM                         |
| standalone  | each client's SLM adapter on its D_k    | each client's SLM                |
| fedavg      | FedCoLLM with distillation off          | global SLM, each client's SLM    |
| fedavg-aux  | FedAvg, then both models tuned on D_a   | LLM, global SLM, each client's SLM |
|             | (FedCoLLM with kd_weight = 0)           |                                  |
| centralized | the LLM adapter on D_a and all D_k      | LLM (an upper bound)             |
| fedcollm    | Algorithm 1                             | LLM, global SLM, each client's SLM |
| fedcollm-  | Algorithm 1, each model learning from   | LLM, global SLM, each client's SLM |
|  selective  | the other only where the other is better |                                 |
|             | (`distill.selection`, FedMKT's rule)    |                                  |

Standalone and centralized are the clients' SFT loop on other data; fedavg and fedcollm are
the same Flower run. fedavg-aux separates distillation from data: FedCoLLM's SLM also trains
on D_a (about a fifth more supervised rows), which FedAvg never sees; with kd_weight = 0 it
keeps those rows and loses only the distance terms. The budget is the same in optimiser
passes: T rounds of E local epochs (or T x max_steps steps) for a standalone client; the
same epochs over the union of all data for the centralised LLM (or the total steps FedCoLLM
spends: T x (K x max_steps + R)).
Each (task, method, seed) leaves `runs/<task>/<method>/seed<seed>/result.json`, with every
scored model's per-question predictions beside its scores, and the final PEFT adapters it
trained under `adapters/` (federated: the global SLM's and the LLM's; standalone: each
client's; centralized: the LLM's); a re-run on the same directory skips what is there.
With clients of several SLMs, each method scores each group's SLMs and the report compares
the methods within each group (`grouped.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedcollm import seeds
from fedcollm.algorithm.compute import Budget, client_budget, simulated_schedule
from fedcollm.algorithm.distillation import distillation_steps
from fedcollm.algorithm.groups import role, slm_groups
from fedcollm.algorithm.training import fine_tune
from fedcollm.config import Config
from fedcollm.data import encode_examples, evaluation_questions, training_split
from fedcollm.evaluation import Scores, score
from fedcollm.experiments.grouped import grouped_result
from fedcollm.models import build_llm, build_slm, get_adapter, save_adapter, set_adapter
from fedcollm.registry import METHODS, METRICS
from fedcollm.tracking.metrics import worth_reporting

Runner = Callable[[Config, Path], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    `scores`: the roles it scores, of "llm", "slm_clients" (each client's own adapter) and
    "slm_global"; `pairs`: (role, baseline) comparisons it carries in the Significance
    section; `curves`: (role, matplotlib style) of its per-round plot, "llm" or "slm"."""

    name: str
    label: str  # its row in Table 1
    short: str  # its name in a comparison
    run: Runner
    scores: tuple[str, ...]
    configure: Callable[[Config], None] = lambda config: None
    trains: bool = True  # False: one run stands for every seed
    default: bool = True  # run when `experiment --methods` is not given
    pairs: tuple[tuple[str, str], ...] = ()
    curves: tuple[tuple[str, str], ...] = ()


def register_method(method: Method) -> Method:
    return METHODS.register(method.name, method)


def _score(model, tokenizer, config: Config, label: str) -> Scores:
    """The model's scores, with a line before and after: scoring a 1.5B model takes minutes."""
    questions = evaluation_questions(config)
    print(f"  {label}: scoring {len(questions)} questions", flush=True)
    start = time.perf_counter()
    scores = score(model, tokenizer, config, questions)
    headline = next(iter(scores.values))
    took = time.perf_counter() - start
    print(f"  {label}: {headline} {scores.mean(headline):.3f} ({took:.0f} s)", flush=True)
    return scores


def _result(
    llm: Scores | None, slm_global: Scores | None, slm_clients: list[Scores] | None
) -> dict[str, Any]:
    """A result's scores, and per question what each scored model answered."""
    result: dict[str, Any] = {
        "llm": llm and llm.summary(),
        "slm_global": slm_global and slm_global.summary(),
        "slm_clients": slm_clients and [s.summary() for s in slm_clients],
    }
    result["predictions"] = {
        "llm": llm and llm.predictions(),
        "slm_global": slm_global and slm_global.predictions(),
        "slm_clients": slm_clients and [s.predictions() for s in slm_clients],
    }
    return result


def _sft(
    model,
    tokenizer,
    examples,
    config: Config,
    *,
    lr: float,
    max_steps: int,
    seed: int,
    label: str,
    budget: Budget | None = None,
) -> None:
    """`config.rounds` rounds' worth of local epochs (the [client] table's, or a client's
    own `budget`) in one run."""
    budget = budget or client_budget(config, None)

    def progress(step: int, total: int, loss: float) -> None:
        if worth_reporting(step, total):
            print(f"  {label}: step {step}/{total} loss {loss:.3f}", flush=True)

    fine_tune(
        model,
        examples,
        epochs=config.rounds * budget.local_epochs,
        max_steps=max_steps,
        batch_size=budget.batch_size,
        lr=lr,
        optim=config.optim,
        pad_id=tokenizer.pad_token_id,
        seed=seed,
        on_step=progress,
    )


def zero_shot(config: Config, _out: Path) -> dict[str, Any]:
    llm, tokenizer = build_llm(config)
    llm_score = _score(llm, tokenizer, config, "LLM")
    del llm
    parts, groups = {}, slm_groups(config)
    for group in groups:  # each SLM once (one group: the [slm] table's)
        slm, tokenizer = build_slm(replace(config, slm=group.slm))
        label = "SLM" if len(groups) == 1 else f"SLM {group.name}"
        slm_score = _score(slm, tokenizer, config, label)
        parts[group.name] = slm_score, [slm_score]
    return grouped_result(_result, llm_score, parts)


def standalone(config: Config, out: Path) -> dict[str, Any]:
    """Each client tunes alone on its D_k with the federated run's local budget (its own
    profile's, and the steps the round's deadline leaves it), on its own SLM; each client's
    final adapter is kept (`adapters/client<k>`, PEFT format)."""
    questions, split = training_split(config)
    parts = {}
    for group in slm_groups(config):
        group_config = replace(config, slm=group.slm)
        slm, tokenizer = build_slm(group_config)
        initial = get_adapter(slm)
        scores = []
        for k in group.clients:
            indices = split.clients[k]
            set_adapter(slm, initial)
            budget = client_budget(config, k)
            per_round = simulated_schedule(config, budget, len(indices)).steps
            if per_round:  # a client the deadline always drops learns nothing
                _sft(
                    slm,
                    tokenizer,
                    encode_examples(questions, indices, tokenizer, group_config),
                    config,
                    lr=config.client.lr,
                    max_steps=config.rounds * per_round,
                    seed=seeds.standalone_client(config.seed, k),
                    label=f"client {k}",
                    budget=budget,
                )
            save_adapter(slm, out / "adapters" / f"client{k}")
            scores.append(_score(slm, tokenizer, group_config, f"client {k}"))
        parts[group.name] = None, scores
    return grouped_result(_result, None, parts)


def centralized(config: Config, out: Path) -> dict[str, Any]:
    """The LLM tuned on all the data at once: the paper's upper bound for the LLM; its
    adapter is kept (`adapters/llm`)."""
    llm, tokenizer = build_llm(config)
    questions, split = training_split(config)
    everything = sorted(split.aux + [i for part in split.clients for i in part])
    # FedCoLLM's optimiser steps per round: K clients' local steps, then R on D_a.
    kd_steps = distillation_steps(config.distill, len(split.aux))
    steps_per_round = config.num_clients * config.client.max_steps + kd_steps
    max_steps = config.rounds * steps_per_round if config.client.max_steps else 0
    if config.client.profiles or config.client.deadline_s:  # each client's own steps
        local = [
            simulated_schedule(config, client_budget(config, k), len(part)).steps
            for k, part in enumerate(split.clients)
        ]
        max_steps = config.rounds * (sum(local) + kd_steps)
    _sft(
        llm,
        tokenizer,
        encode_examples(questions, everything, tokenizer, config),
        config,
        lr=config.distill.llm_lr,
        max_steps=max_steps,
        seed=seeds.centralized(config.seed),
        label="LLM",
    )
    save_adapter(llm, out / "adapters" / "llm")
    return _result(_score(llm, tokenizer, config, "LLM"), None, None)


def federated(config: Config, out: Path) -> dict[str, Any]:
    from fedcollm.federation.simulation import simulate
    from fedcollm.tracking.checkpoint import latest_round
    from fedcollm.tracking.metrics import read_predictions

    # A run that was interrupted goes on from its last complete round.
    rows = simulate(config, out, resume=latest_round(out / "checkpoint") is not None)
    last = rows[-1]
    trained_llm = config.distill.enabled
    answered = read_predictions(out, last["round"])
    clients = answered.get("clients", {})
    groups = slm_groups(config)

    def scores(slm: str, members) -> dict[str, Any]:
        """A global SLM's scores (`slm`: its role in the rows) and its clients' own."""
        own = [c for c in last["clients"] if c["partition"] in members]
        return {
            "slm_global": _row_score(last, slm),
            "slm_clients": [
                {
                    **{k[4:]: v for k, v in c.items() if k.startswith("own_")},
                    "n": last["eval_questions"],
                }
                for c in own
            ],
            "predictions": {
                "slm_global": answered.get(slm),
                "slm_clients": [clients.get(str(c["partition"])) for c in own],
            },
        }

    result = {
        "llm": _row_score(last, "llm") if trained_llm else None,
        "predictions": {"llm": answered.get("llm") if trained_llm else None},
        "history": rows,
    }
    if len(groups) == 1:
        one = scores("slm", range(config.num_clients))
        result["predictions"].update(one.pop("predictions"))
        return {**result, **one}
    result.update(slm_global=None, slm_clients=None)
    result["groups"] = {g.name: scores(role(g.name), g.clients) for g in groups}
    return result


def _row_score(row: dict[str, Any], role: str) -> dict[str, float]:
    """A role's metrics in a metrics row (`slm_acc`, `slm_acc_stderr`...) as a summary."""
    names = {*METRICS, "majority"}
    scores = {}
    for key, value in row.items():
        metric = key.removeprefix(f"{role}_").removesuffix("_stderr")
        if key.startswith(f"{role}_") and metric in names:
            scores[key.removeprefix(f"{role}_")] = value
    return {**scores, "n": row["eval_questions"]}


def _without_distillation(config: Config) -> None:
    config.distill.enabled = False


def _without_the_distance(config: Config) -> None:
    """D_a's cross-entropy for both models, no distillation."""
    config.distill.enabled, config.distill.kd_weight = True, 0.0


def _selective(config: Config) -> None:
    """The config's gate, or the per-position one where it names none."""
    if config.distill.selection == "none":
        config.distill.selection = "position"


# The order of registration is Table 1's order within each of its blocks.
register_method(
    Method("zero-shot", "Zero-shot", "Zero-shot", zero_shot, ("llm", "slm_clients"), trains=False)
)
register_method(Method("standalone", "Standalone", "Standalone", standalone, ("slm_clients",)))
register_method(Method("centralized", "Centralized", "Centralized", centralized, ("llm",)))
register_method(
    Method(
        "fedavg",
        "FedAvg",
        "FedAvg",
        federated,
        ("slm_clients", "slm_global"),
        configure=_without_distillation,
        curves=(("slm", "s--"),),
    )
)
register_method(
    Method(
        "fedavg-aux",
        "FedAvg + D_a (kd_weight 0)",
        "FedAvg + D_a",
        federated,
        ("llm", "slm_clients", "slm_global"),
        configure=_without_the_distance,
        default=False,
        curves=(("slm", "s:"), ("llm", "o:")),
    )
)
register_method(
    Method(
        "fedcollm",
        "FedCoLLM",
        "FedCoLLM",
        federated,
        ("llm", "slm_clients", "slm_global"),
        # The claims, then what the distillation does to the broadcast theta: the distilled
        # global adapter against FedAvg's plain average and against FedAvg + D_a (the same
        # D_a rows and steps without the distance), which leaves the distillation alone.
        pairs=(
            ("slm_clients", "standalone"),
            ("slm_clients", "fedavg"),
            ("slm_clients", "fedavg-aux"),
            ("slm_global", "fedavg"),
            ("slm_global", "fedavg-aux"),
            ("llm", "centralized"),
            ("llm", "zero-shot"),
            ("llm", "fedavg-aux"),
        ),
        curves=(("llm", "o-"), ("slm", "s-")),
    )
)
register_method(
    Method(
        "fedcollm-selective",
        "FedCoLLM, selective distillation",
        "FedCoLLM selective",
        federated,
        ("llm", "slm_clients", "slm_global"),
        configure=_selective,
        default=False,
        # Selection against Algorithm 1, and against the same rows without any distance.
        pairs=(
            ("slm_clients", "standalone"),
            ("slm_global", "fedcollm"),
            ("slm_global", "fedavg-aux"),
            ("llm", "fedcollm"),
            ("llm", "centralized"),
            ("llm", "fedavg-aux"),
        ),
        curves=(("llm", "o-."), ("slm", "s-.")),
    )
)
