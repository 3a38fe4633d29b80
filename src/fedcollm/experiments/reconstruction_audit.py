"""The reconstruction audit (`fedcollm audit --attack reconstruction`): how much of client
batches the server reads from what it receives, by the attack of `reconstruction.py`.

Client 0's SLM as the config builds it, with its LoRA B drawn at the size a trained B has
(`TRAINED_B_STD`: in round 1 B = 0 and A's update is zero, so round 2 on is the case that
matters), is the broadcast theta. Each of the config's K clients takes `steps` AdamW steps
on `batch` rows of its own training part, each step on all of them (one step is the
single-gradient case, which the server inverts exactly in sign; after more no inversion
exists and the update itself stands in for the gradient, DAGER's FedAvg mode). What the
server holds, three views:

- "gradient": client 0's exact gradient, for reference (what DAGER assumes, and what one
  step of plain SGD would send; fedcollm's clients step with AdamW);
- "upload": client 0's theta_k (no secure aggregation);
- "secagg": the mean of the K uploads (secure aggregation shows only their sum; with SLM
  groups, the K clients of client 0's group);
- "secagg+dp": that mean after DP under secure aggregation: each update clipped to C, the
  sum noised with N(0, (sigma C)^2) (the config's privacy keys, else `DEFAULT_DP`).

The attacker knows theta, the learning rate and weight decay, and, as an upper bound, how
many distinct tokens and prefixes the batch has (the counts `pursue_tokens` and
`grow_sequences` are told). Reported per view and batch size (medians over draws): token-
set precision and recall, ROUGE-1/2 of the recovered sequences against the true ones and
the share recovered exactly (each without its last token, which enters no layer's input
gradient), and the attack's seconds. The sequence search runs only where the second layer's
span can hold the batch (distinct positions <= 3r); elsewhere it cannot succeed and is
marked as not run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedcollm.algorithm.aggregation import weighted_mean
from fedcollm.algorithm.groups import member_config, slm_groups
from fedcollm.algorithm.privacy import clip_update
from fedcollm.algorithm.training import answer_loss, fine_tune
from fedcollm.config import Config, ConfigError
from fedcollm.data import collate, encode_examples, training_split
from fedcollm.evaluation.text_metrics import rouge
from fedcollm.experiments.reconstruction import (
    adam_observations,
    branch_counts,
    first_layer_inputs,
    gradient_estimate,
    grow_sequences,
    input_span,
    layer_rows,
    precision_recall,
    pursue_tokens,
)
from fedcollm.models import Adapter, build_slm, get_adapter, set_adapter
from fedcollm.tracking.plots import figure

TRAINED_B_STD = 2.6e-3  # the demo SLM's B after two rounds
DEFAULT_DP = (0.5, 1.0)  # (C, sigma) where the config sets none
VIEWS = ("gradient", "upload", "secagg", "secagg+dp")


@dataclass
class AttackSettings:
    batches: tuple[int, ...] = (1, 4, 16)
    draws: int = 2
    steps: int = 1


def run_reconstruction(
    config: Config, settings: AttackSettings, progress: Callable[[str], None]
) -> dict:
    """Every (batch size, draw, view) case's attack; the medians per (view, batch)."""
    member = member_config(config, 0)
    questions, split = training_split(config)
    # The clients whose uploads are summed with client 0's: its SLM group's (all of them
    # where every client holds the same SLM).
    group = next(g.clients for g in slm_groups(config) if 0 in g.clients)
    parts = [split.clients[k] for k in group]
    needed = max(settings.batches) * settings.draws
    if min(len(rows) for rows in parts) < needed:
        raise ConfigError(
            f"--batches/--draws: each client needs {needed} training rows, the smallest part "
            f"has {min(len(r) for r in parts)}; use smaller batches or fewer draws"
        )
    slm, tokenizer = build_slm(member)
    draw_trained_b(slm, config.seed)
    theta = get_adapter(slm)
    inputs = first_layer_inputs(slm)
    dp = _dp_settings(config)
    cases = []
    for batch in settings.batches:
        for draw in range(settings.draws):
            batches = [rows[draw * batch : (draw + 1) * batch] for rows in parts]
            examples = [encode_examples(questions, rows, tokenizer, member) for rows in batches]
            uploads = [
                local_update(member, slm, tokenizer, theta, e, settings.steps) for e in examples
            ]
            gradient = batch_gradient(slm, tokenizer, theta, examples[0])
            seen = {
                "gradient": (gradient, examples[0]),
                "upload": (uploads[0], examples[0]),
                "secagg": (_mean(uploads), sum(examples, [])),
                "secagg+dp": (_noised_mean(uploads, theta, *dp, seed=draw), sum(examples, [])),
            }
            for view in VIEWS:
                upload, batch_examples = seen[view]
                steps = 0 if view == "gradient" else settings.steps
                case = attack(slm, tokenizer, upload, theta, member, batch_examples, inputs, steps)
                cases.append({"view": view, "batch": batch, "draw": draw, **case})
                progress(_progress_line(cases[-1]))
    return {
        "model": member.slm.name or "tiny",
        "rank": member.lora.r,
        "lora_dropout": member.lora.dropout,
        "clients": len(group),
        "dp": {"clip_norm": dp[0], "noise_multiplier": dp[1]},
        "settings": {
            "batches": list(settings.batches),
            "draws": settings.draws,
            "steps": settings.steps,
        },
        "cases": cases,
        "summary": summarise(cases),
    }


def attack(slm, tokenizer, upload, theta, config, examples, inputs, steps: int = 1) -> dict:
    """The attack on one view: tokens from the first layer, sequences from the second.
    `steps`: the AdamW steps behind `upload`; 0: `upload` is a gradient itself."""
    lr, optim = config.client.lr, config.optim
    true_tokens = {t for e in examples for t in e.input_ids}
    sequences = [list(e.input_ids[:-1]) for e in examples]
    start = time.perf_counter()
    estimate = upload if steps == 0 else gradient_estimate(upload, theta, lr, optim, steps)
    if steps == 1:
        rows, observed = adam_observations(upload, theta, lr, optim)
    else:
        rows = layer_rows(estimate)
        observed = torch.ones_like(rows, dtype=torch.bool)
    tokens = pursue_tokens(inputs, rows, observed, len(true_tokens))
    branches = branch_counts(sequences)
    positions = sum(branches)
    found = None
    if positions <= 3 * config.lora.r:
        found = grow_sequences(slm, tokens, input_span(estimate, layer=1), branches)
    seconds = time.perf_counter() - start
    precision, recall = precision_recall(set(tokens), true_tokens)
    return {
        "distinct_tokens": len(true_tokens),
        "positions": positions,
        "token_precision": precision,
        "token_recall": recall,
        **sequence_scores(found, sequences, tokenizer),
        "seconds": seconds,
    }


def sequence_scores(found, sequences, tokenizer) -> dict:
    """ROUGE-1/2 F of each true sequence against its best recovered one (means), and the
    share recovered exactly; None where the search did not run."""
    if found is None:
        return {"rouge1": None, "rouge2": None, "exact": None}
    texts = [tokenizer.decode(s) for s in found] or [""]
    truth = [tokenizer.decode(s) for s in sequences]
    return {
        "rouge1": statistics.fmean(rouge(t, texts, "rouge1") for t in truth),
        "rouge2": statistics.fmean(rouge(t, texts, "rouge2") for t in truth),
        "exact": statistics.fmean(s in found for s in sequences),
    }


def summarise(cases: list[dict]) -> list[dict]:
    """Medians over draws per (view, batch)."""
    keys = ("token_precision", "token_recall", "rouge1", "rouge2", "exact", "seconds")
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        groups.setdefault((case["view"], case["batch"]), []).append(case)
    summary = []
    for (view, batch), group in groups.items():
        row = {"view": view, "batch": batch, "distinct_tokens": group[0]["distinct_tokens"]}
        for key in keys:
            values = [c[key] for c in group if c[key] is not None]
            row[key] = statistics.median(values) if values else None
        summary.append(row)
    return summary


def reconstruction_table(results: dict) -> str:
    dp = results["dp"]
    lines = [
        f"Reconstruction from {_steps(results)}: {results['model']}, LoRA rank {results['rank']} "
        f"(dropout {results['lora_dropout']}), {results['clients']} clients; DP view: C = "
        f"{dp['clip_norm']}, sigma = {dp['noise_multiplier']}. Medians of "
        f"{results['settings']['draws']} draws; the attacker is told the counts. Sequences: "
        "- where the batch has more distinct positions than the 3r directions the second "
        "layer shows (the search cannot succeed there).",
        "",
        "| view | batch | distinct tokens | token precision | token recall | ROUGE-1 | "
        "ROUGE-2 | exact | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        cells = [_cell(row[k]) for k in ("token_precision", "token_recall", "rouge1", "rouge2")]
        cells += [_cell(row["exact"]), f"{row['seconds']:.1f}"]
        lines.append(
            f"| {row['view']} | {row['batch']} | {row['distinct_tokens']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot_reconstruction(results: dict, path) -> None:
    """Token precision and ROUGE-1 per view, one bar per batch size."""
    batches = results["settings"]["batches"]
    width = 0.8 / len(batches)
    with figure(path, 1, 2, figsize=(10, 4.4)) as (fig, axes):
        panels = (("token_precision", "token-set precision"), ("rouge1", "ROUGE-1 of sequences"))
        for ax, (key, title) in zip(axes, panels, strict=True):
            for i, batch in enumerate(batches):
                rows = {r["view"]: r for r in results["summary"] if r["batch"] == batch}
                values = [rows[v][key] for v in VIEWS]
                places = [j + i * width for j in range(len(VIEWS))]
                ax.bar(places, [v or 0.0 for v in values], width, label=f"batch {batch}")
                for place, value in zip(places, values, strict=True):
                    if value is None:  # the sequence search could not succeed: say so
                        ax.text(place, 0.02, "not run", rotation=90, ha="center", fontsize=8)
            ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(VIEWS))])
            ax.set_xticklabels(VIEWS)
            ax.set_ylim(0, 1.05)
            ax.set_title(title)
            ax.legend()
        fig.suptitle(
            f"What the server reads from {_steps(results)}: {results['model']}, LoRA rank "
            f"{results['rank']}\n(not run: more positions than the 3r directions layer 2 shows)"
        )


def _steps(results: dict) -> str:
    steps = results["settings"].get("steps", 1)
    return "one AdamW step" if steps == 1 else f"{steps} AdamW steps"


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _progress_line(case: dict) -> str:
    rouge1 = "-" if case["rouge1"] is None else f"{case['rouge1']:.2f}"
    return (
        f"  reconstruction: {case['view']} batch {case['batch']} draw {case['draw']}: token "
        f"precision {case['token_precision']:.2f} of {case['distinct_tokens']}, ROUGE-1 "
        f"{rouge1} ({case['seconds']:.1f} s)"
    )


def draw_trained_b(slm, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in slm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * TRAINED_B_STD)


def local_update(config: Config, slm, tokenizer, theta: Adapter, examples, steps: int) -> Adapter:
    """theta_k after `steps` AdamW steps, each on the whole batch, as a client takes them."""
    set_adapter(slm, theta)
    fine_tune(slm, examples, epochs=steps, max_steps=steps, batch_size=len(examples),
              lr=config.client.lr, optim=config.optim, pad_id=tokenizer.pad_token_id,
              seed=config.seed)  # fmt: skip
    upload = get_adapter(slm)
    set_adapter(slm, theta)
    return upload


def batch_gradient(slm, tokenizer, theta: Adapter, examples) -> Adapter:
    """The answer loss's gradient at theta on the whole batch, keyed as an adapter."""
    set_adapter(slm, theta)
    slm.train()
    answer_loss(slm, collate(examples, tokenizer.pad_token_id)).backward()
    gradient = {n: p.grad.clone() for n, p in slm.named_parameters() if p.requires_grad}
    slm.zero_grad(set_to_none=True)
    return {k.replace(".default", ""): v for k, v in gradient.items()}


def _mean(uploads: list[Adapter]) -> Adapter:
    return weighted_mean(uploads, [1 / len(uploads)] * len(uploads))


def _noised_mean(uploads, theta, clip_norm, noise_multiplier, seed) -> Adapter:
    """theta + (sum of clipped updates + N(0, (sigma C)^2)) / K, as DP under secure
    aggregation gives the server."""
    clipped = _mean([clip_update(u, theta, clip_norm)[0] for u in uploads])
    generator = torch.Generator().manual_seed(seed)
    std = noise_multiplier * clip_norm / len(uploads)
    return {
        k: (
            v.double() + torch.randn(v.shape, generator=generator, dtype=torch.float64) * std
        ).float()
        for k, v in clipped.items()
    }


def _dp_settings(config: Config) -> tuple[float, float]:
    privacy = config.privacy
    if privacy.clip_norm > 0 and privacy.noise_multiplier > 0:
        return privacy.clip_norm, privacy.noise_multiplier
    return DEFAULT_DP
