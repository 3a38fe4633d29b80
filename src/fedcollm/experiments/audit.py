"""A leakage audit: what an attacker holding each artefact of a run learns about one client's
private data (client 0's).

- Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019): `canaries`
  random six-digit secrets in a fixed template are added to client 0's data, each
  `repeats` times. After the run each secret's likelihood is ranked among `candidates`
  six-digit numbers never inserted; exposure = log2(candidates + 1) - log2(rank). A model
  that learnt nothing of a secret ranks it at random: about log2(e) = 1.44 bits on average;
  the most a ranking can show is log2(candidates + 1).
- Loss-based membership inference (Yeom et al. 2018): the AUC of telling client 0's training
  rows from rows nobody trained on (unused training rows, else the evaluation split) by
  their answer loss; 0.5 is chance.

The artefacts: client 0's upload in its last round (what the server or a wire-tapper holds;
under DP its clipped and, with secure aggregation, noised update), the global theta after
the last round (every client holds it), and the server's LLM with omega. The run is the
in-process reference of the Flower run (`algorithm.round.reference_rounds`), which gives
the same adapters bit for bit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from fedcollm.algorithm.client import Client
from fedcollm.algorithm.grouped_server import GroupedServer, server_for
from fedcollm.algorithm.privacy import update_norm
from fedcollm.algorithm.round import in_process_clients, reference_rounds
from fedcollm.config import Config
from fedcollm.data import (
    Question,
    encode_examples,
    evaluation_questions,
    get_task,
    training_split,
)
from fedcollm.data.encoding import as_prompted
from fedcollm.evaluation import score
from fedcollm.evaluation.generation import target_losses
from fedcollm.models import Adapter, set_adapter
from fedcollm.tracking.plots import figure

TEMPLATE = "Question: What is the account number of {name}?\nAnswer:"
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "Emmy Noether"]
NAMES += ["Kurt Goedel", "Hedy Lamarr", "John von Neumann", "Barbara Liskov", "Edsger Dijkstra"]
SEED = 2019  # the canaries and candidates, apart from the run's seed
SECRETS = 900_000  # the six-digit numbers: every canary and candidate is one


@dataclass
class AuditSettings:
    canaries: int = 5
    repeats: int = 10
    candidates: int = 200


def make_canaries(count: int, rng: random.Random) -> list[Question]:
    secrets = rng.sample(range(100_000, 100_000 + SECRETS), count)
    return [
        Question(f"canary-{i}", TEMPLATE.format(name=NAMES[i]), (str(s),), 0, str(s))
        for i, s in enumerate(secrets)
    ]


def exposures(
    model, tokenizer, canaries: list[Question], candidates: int, rng, prompt_format="plain"
) -> list[float]:
    """Each canary's exposure among `candidates` secrets never inserted (drawn by `rng`),
    each read as the clients trained on it (`data.prompt_format`)."""
    inserted = {c.answer for c in canaries}
    result = []
    for canary in canaries:
        others: dict[str, None] = {}  # drawn in order, each once
        while len(others) < candidates:
            guess = str(rng.randrange(100_000, 1_000_000))
            if guess not in inserted:
                others.setdefault(guess)
        tries = [replace(canary, choices=(s,), answer=s) for s in [canary.answer, *others]]
        tries = as_prompted(tries, tokenizer, prompt_format)
        nll = target_losses(model, tokenizer, tries, batch_size=32, total=True)
        rank = 1 + sum(other < nll[0] for other in nll[1:])
        result.append(math.log2(candidates + 1) - math.log2(rank))
    return result


def membership_auc(
    model, tokenizer, members: list[Question], others: list[Question], prompt_format="plain"
) -> float:
    """P(a member's loss < a non-member's), ties counted half: the loss attack's AUC."""
    member_loss = target_losses(model, tokenizer, as_prompted(members, tokenizer, prompt_format))
    other_loss = target_losses(model, tokenizer, as_prompted(others, tokenizer, prompt_format))
    wins = sum((m < o) + 0.5 * (m == o) for m in member_loss for o in other_loss)
    return wins / (len(member_loss) * len(other_loss))


class RecordingClient(Client):
    """Client 0 with what it uploaded in its last round kept."""

    upload: Adapter | None = None
    upload_norm: float | None = None  # ||upload - theta||: what privacy.clip_norm bounds

    def update(self, slm_adapter, server_round, on_step=None):
        result = super().update(slm_adapter, server_round, on_step)
        self.upload = {k: v.clone() for k, v in result.adapter.items()}
        self.upload_norm = update_norm(result.adapter, slm_adapter)
        return result


def held_out(
    config: Config, questions: list[Question], split, count: int, rng: random.Random
) -> list[Question]:
    """Rows no party trained on: unused training rows of `split` when there are enough,
    else the evaluation split's."""
    used = set(split.aux).union(*map(set, split.clients))
    unused = [q for i, q in enumerate(questions) if i not in used]
    pool = unused if len(unused) >= count else evaluation_questions(config)
    return rng.sample(pool, min(count, len(pool)))


def run_audit(
    config: Config, settings: AuditSettings, progress: Callable[[str], None] = print
) -> dict:
    """Train with canaries in client 0's data, then measure every artefact. With clients of
    several SLMs, the artefacts are those of client 0's SLM (its group's theta)."""
    rng = random.Random(SEED)
    canaries = make_canaries(settings.canaries, rng)
    server = server_for(config, progress=progress)
    clients = in_process_clients(config)
    target = RecordingClient(**{k: getattr(clients[0], k) for k in Client.__dataclass_fields__})
    # Client 0's SLM on the server: the server's own, or its group's.
    own = server.servers[server.group_of(0)] if isinstance(server, GroupedServer) else server
    inserted = encode_examples(canaries, range(len(canaries)), own.tokenizer, target.config)
    target.client_data = target.client_data + inserted * settings.repeats
    clients[0] = target
    questions, split = training_split(config)
    members = [questions[i] for i in split.clients[0]]
    non_members = held_out(config, questions, split, len(members), random.Random(SEED + 1))
    eval_questions = evaluation_questions(config)
    progress(
        f"audit: {settings.canaries} canaries x {settings.repeats} in client 0's "
        f"{len(members)} rows; membership against {len(non_members)} held-out rows; "
        f"{config.rounds} rounds of {config.num_clients} clients in this process"
    )

    metric = get_task(config.task).metric_names[0]  # acc, or rougeL for generation
    prompt_format = config.data.prompt_format

    def measure(name: str, model, tokenizer) -> dict:
        progress(f"audit: measuring {name}")
        draws = random.Random(SEED + 2)  # the same candidates for every artefact
        exposure = exposures(model, tokenizer, canaries, settings.candidates, draws, prompt_format)
        scores = score(model, tokenizer, config, eval_questions).summary()
        auc = membership_auc(model, tokenizer, members, non_members, prompt_format)
        return {
            "exposure": sum(exposure) / len(exposure),
            "exposure_per_canary": exposure,
            "membership_auc": auc,
            metric: scores[metric],
            f"{metric}_stderr": scores.get(f"{metric}_stderr"),
        }

    # The untrained SLM is the control: it never saw a canary, so it ranks them at about
    # chance. (The untrained LLM would be another such control, at four times the cost.)
    artefacts = {"base SLM": measure("the SLM before training", own.slm, own.tokenizer)}
    theta = server.slm_adapter
    for server_round, result in enumerate(reference_rounds(config, server, clients), 1):
        theta = result.slm_adapter
        losses = " ".join(f"{k} {v:.3f}" for k, v in result.losses.items())
        progress(f"audit: round {server_round}/{config.rounds} trained; distillation {losses}")
    if target.upload is not None:  # None when sampling never chose client 0
        set_adapter(own.slm, target.upload)
        artefacts["client 0's upload"] = measure("client 0's upload", own.slm, own.tokenizer)
    set_adapter(own.slm, server.broadcast_to(0, theta))
    artefacts["global theta"] = measure("the global theta", own.slm, own.tokenizer)
    artefacts["LLM with omega"] = measure("the LLM with omega", server.llm, own.llm_tokenizer)
    privacy = server.privacy.spent() if config.privacy.enabled else {}
    return {
        "settings": vars(settings),
        "privacy": {k: getattr(config.privacy, k) for k in ("clip_norm", "noise_multiplier")},
        **privacy,
        "chance_exposure": math.log2(math.e),
        "max_exposure": math.log2(settings.candidates + 1),
        "metric": metric,
        "eval_questions": len(eval_questions),
        "upload_norm": target.upload_norm,
        "artefacts": artefacts,
    }


def audit_table(results: dict) -> str:
    """The audit as a Markdown table, one row per artefact."""
    epsilon = results.get("epsilon")
    eps = "no DP" if epsilon is None else f"epsilon {epsilon:.3g} (delta {results['delta']:g})"
    lines = [
        f"clip {results['privacy']['clip_norm']:g}, noise multiplier "
        f"{results['privacy']['noise_multiplier']:g}: {eps}; exposure chance "
        f"{results['chance_exposure']:.2f}, max {results['max_exposure']:.2f} bits",
        "",
        f"| artefact | canary exposure (bits) | membership AUC | {_metric(results)} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, a in results["artefacts"].items():
        lines.append(
            f"| {name} | {a['exposure']:.2f} | {a['membership_auc']:.3f} | {_score(results, a)} |"
        )
    return "\n".join(lines)


def _metric(results: dict) -> str:
    return results.get("metric", "acc")


def _score(results: dict, artefact: dict) -> str:
    metric = _metric(results)
    stderr = artefact.get(f"{metric}_stderr")
    return f"{artefact[metric]:.3f}" + (f" (se {stderr:.3f})" if stderr is not None else "")


def setting_label(results: dict) -> str:
    """ "no DP", or the clipping bound, the noise multiplier and the epsilon they give."""
    clip, noise = results["privacy"]["clip_norm"], results["privacy"]["noise_multiplier"]
    if not clip:
        return "no DP"
    if not noise:
        return f"clip {clip:g}, no noise (epsilon inf)"
    return f"clip {clip:g}, sigma {noise:g} (epsilon {results['epsilon']:.3g})"


def comparison_table(audits: list[dict]) -> str:
    """Several audits of one configuration (say without DP and at two noise levels), one
    row per setting and artefact."""
    lines = [
        f"| setting | artefact | canary exposure (bits) | membership AUC | {_metric(audits[0])} |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for results in audits:
        for name, a in results["artefacts"].items():
            lines.append(
                f"| {setting_label(results)} | {name} | {a['exposure']:.2f} | "
                f"{a['membership_auc']:.3f} | {_score(results, a)} |"
            )
    return "\n".join(lines)


def plot_comparison(audits: list[dict], path) -> None:
    """Exposure, membership AUC and accuracy of each artefact, one bar per setting."""
    names = list(audits[0]["artefacts"])
    with figure(path, 1, 3, figsize=(15, 4.8), dpi=110, rect=(0, 0, 1, 0.9)) as (fig, axes):
        width = 0.8 / len(audits)
        panels = (
            ("exposure", "canary exposure (bits)", "chance_exposure", "max_exposure"),
            ("membership_auc", "membership AUC", None, None),
            (_metric(audits[0]), _metric(audits[0]), None, None),
        )
        for axis, (key, title, low, high) in zip(axes, panels, strict=True):
            for i, results in enumerate(audits):
                values = [results["artefacts"].get(n, {}).get(key, float("nan")) for n in names]
                positions = [j + (i - (len(audits) - 1) / 2) * width for j in range(len(names))]
                axis.bar(positions, values, width, label=setting_label(results))
            if low:
                axis.axhline(audits[0][low], color="grey", ls="--", lw=1, label="chance")
                axis.axhline(audits[0][high], color="black", ls=":", lw=1, label="maximum")
            if key == "membership_auc":
                axis.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
                axis.set_ylim(0.4, 1.0)
            axis.set_xticks(range(len(names)), names, rotation=15)
            axis.set_title(title)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9)
