"""How much of a client's batch the server reads from one upload, on a registry SLM (issue 29).

A client holding `--model` (default SmolLM2-135M) with LoRA of rank r on q, k, v and o, as
in round 2 or later (B drawn with the standard deviation a trained B has: 2.6e-3, the demo
SLM's after two rounds; in round 1 B = 0 and A's update is zero), takes one AdamW step on
its first `batch` training rows of ARC-Easy, as fedcollm's clients do. The server inverts
the step on the entries fp32 kept (`adam_observations`) and pursues as many tokens as the
batch has distinct ones (an oracle count; `pursue_tokens`). Reported per (rank, batch): the
batch's distinct tokens, the share of observed entries, the token-set precision (= recall,
with the oracle count) and the attack's seconds. Also the same pursuit on the exact gradient
(what an SGD client's upload would give), for reference; and at rank 8, what secure
aggregation shows (the mean of four clients' one-step uploads) and two local steps.

    .venv/bin/python benchmarks/reconstruction.py --data-dir ../shared/data --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import machine

from fedcollm.algorithm.training import fine_tune
from fedcollm.config import load_config
from fedcollm.data import encode_examples, load_questions
from fedcollm.experiments.reconstruction import (
    adam_observations,
    first_layer_inputs,
    gradient_estimate,
    layer_rows,
    precision_recall,
    pursue_tokens,
)
from fedcollm.experiments.reconstruction_audit import batch_gradient, draw_trained_b
from fedcollm.models import build_slm, get_adapter, set_adapter


def client(args, rank: int):
    """The client's config, SLM (B as trained) and tokenizer, and theta as broadcast."""
    sets = [f'slm.name="{args.model}"', f"lora.r={rank}", f"lora.alpha={2 * rank}"]
    config = load_config(args.config, overrides=[*sets, "lora.dropout=0.0"])
    slm, tokenizer = build_slm(config)
    draw_trained_b(slm, args.seed)
    return config, slm, tokenizer, get_adapter(slm)


def upload(config, slm, tokenizer, theta, rows: list[int], data_dir: str, steps: int = 1):
    """theta_k after `steps` AdamW steps on training rows `rows` (all of them in one batch
    for one step; one row a step otherwise), and the batch's distinct tokens."""
    set_adapter(slm, theta)
    questions = load_questions("arc_easy", "train", data_dir)
    examples = encode_examples(questions, rows, tokenizer, config)
    size = len(rows) if steps == 1 else 1
    fine_tune(slm, examples, epochs=steps, max_steps=steps, batch_size=size, lr=config.client.lr,
              optim=config.optim, pad_id=tokenizer.pad_token_id, seed=0)  # fmt: skip
    return get_adapter(slm), {t for e in examples for t in e.input_ids}, examples


def one_case(args, rank: int, batch: int) -> dict:
    config, slm, tokenizer, theta = client(args, rank)
    lr = config.client.lr
    questions = load_questions("arc_easy", "train", args.data_dir)
    examples = encode_examples(questions, range(batch), tokenizer, config)
    exact = batch_gradient(slm, tokenizer, theta, examples)
    sent, true, _ = upload(config, slm, tokenizer, theta, list(range(batch)), args.data_dir)
    inputs = first_layer_inputs(slm)
    start = time.perf_counter()
    rows, observed = adam_observations(sent, theta, lr, config.optim)
    chosen = pursue_tokens(inputs, rows, observed, len(true))
    seconds = time.perf_counter() - start
    exact_rows = layer_rows(exact)
    everything = torch.ones_like(exact_rows, dtype=torch.bool)
    exact_chosen = pursue_tokens(inputs, exact_rows, everything, len(true))
    return {
        "rank": rank,
        "batch": batch,
        "distinct_tokens": len(true),
        "observed_share": observed.float().mean().item(),
        "precision_adamw_upload": precision_recall(set(chosen), true)[0],
        "precision_exact_gradient": precision_recall(set(exact_chosen), true)[0],
        "attack_seconds": seconds,
    }


def other_views(args, rank: int = 8, clients: int = 4) -> dict:
    """What secure aggregation shows, the mean of `clients` one-step uploads (client k on
    training row k), and two AdamW steps of one client (rows 0 then 1), whose update is the
    attacker's proxy for the gradient (no inversion exists after a second step)."""
    config, slm, tokenizer, theta = client(args, rank)
    lr, inputs = config.client.lr, first_layer_inputs(slm)
    sent = [upload(config, slm, tokenizer, theta, [k], args.data_dir)[:2] for k in range(clients)]
    mean = {key: sum(s[0][key] for s in sent) / clients for key in theta}
    union = set().union(*(s[1] for s in sent))
    rows, observed = adam_observations(mean, theta, lr, config.optim)
    secure = precision_recall(set(pursue_tokens(inputs, rows, observed, len(union))), union)[0]
    two, true, _ = upload(config, slm, tokenizer, theta, [0, 1], args.data_dir, steps=2)
    proxy = layer_rows(gradient_estimate(two, theta, lr, config.optim, steps=2))
    everything = torch.ones_like(proxy, dtype=torch.bool)
    chosen = pursue_tokens(inputs, proxy, everything, len(true))
    return {
        "rank": rank,
        "secagg_mean_of": clients,
        "secagg_distinct_tokens": len(union),
        "precision_secagg_mean": secure,
        "two_steps_distinct_tokens": len(true),
        "precision_two_steps": precision_recall(set(chosen), true)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = []
    for rank in map(int, args.ranks.split(",")):
        for batch in map(int, args.batches.split(",")):
            cases.append(one_case(args, rank, batch))
            print(json.dumps(cases[-1]), flush=True)
    views = other_views(args)
    print(json.dumps(views), flush=True)
    figures = {"machine": machine(), "model": args.model, "cases": cases, "other_views": views}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
