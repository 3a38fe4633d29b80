"""Does the selective gate pick the rows where the teacher really knows better?

`distill.selection` lets a model learn from the other only where the other's loss on the
gold answer is lower than its own. On multiple choice that loss also measures the answer's
wording, which a tuned SLM learns first (issue 26), so this measures, on D_a of a config
(its split and models, optionally with a finished run's adapters), per example:
- each model's mean loss on the gold answer's tokens (what `selection = "example"`
  compares; the models as they stand here, not mid-step), and
- whether each model ranks the gold choice first (acc, lm-eval's log-likelihood ranking).

It prints the four cells of (loss gate gives the row to the LLM as teacher or not) x (the
LLM right and the SLM wrong, the reverse, both right, both wrong), and the gate's precision
for "the LLM knows better" by ranking. Same tokenizer only (the per-example losses of two
tokenizations are not comparable token for token).

    .venv/bin/python benchmarks/gate_signal.py configs/demo.toml
    .venv/bin/python benchmarks/gate_signal.py configs/demo.toml --adapters runs/demo/adapters
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file

from fedcollm.config import load_config
from fedcollm.data import encode_examples, training_split
from fedcollm.evaluation.generation import example_losses
from fedcollm.evaluation.multiple_choice import accuracy, choice_loglikelihoods
from fedcollm.models import build_llm, build_slm, set_adapter


def per_example(model, tokenizer, questions, config) -> tuple[list[float], list[bool]]:
    """Each D_a question's gold-answer loss (as training encodes it) and whether the model
    ranks the gold choice first."""
    examples = encode_examples(questions, range(len(questions)), tokenizer, config)
    losses = example_losses(model, examples, tokenizer.pad_token_id, config.eval.batch_size)
    lls = choice_loglikelihoods(model, tokenizer, questions, config.eval.batch_size)
    picks = accuracy(questions, lls).predictions
    return losses, [p == q.gold for p, q in zip(picks, questions, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--data-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--adapters", type=Path, help="a run's adapters/ (holding slm/ and llm/)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()
    config = load_config(args.config, overrides=args.set, data_dir=args.data_dir)
    questions, split = training_split(config)
    aux = [questions[i] for i in split.aux]
    measured = {}
    for role, build in (("llm", build_llm), ("slm", build_slm)):
        model, tokenizer = build(config)
        if args.adapters:
            set_adapter(model, load_file(args.adapters / role / "adapter_model.safetensors"))
        measured[role] = per_example(model, tokenizer, aux, config)
        print(
            f"{role}: D_a loss {statistics.fmean(measured[role][0]):.3f}, "
            f"acc {statistics.fmean(measured[role][1]):.3f}",
            flush=True,
        )
        del model
    (llm_loss, llm_right), (slm_loss, slm_right) = measured["llm"], measured["slm"]
    cells: Counter = Counter()
    for i in range(len(aux)):
        gate = "gate: LLM teaches" if llm_loss[i] < slm_loss[i] else "gate: SLM teaches"
        ranking = {
            (True, False): "LLM right, SLM wrong",
            (False, True): "SLM right, LLM wrong",
            (True, True): "both right",
            (False, False): "both wrong",
        }[llm_right[i], slm_right[i]]
        cells[gate, ranking] += 1
    llm_knows = [lr and not sr for lr, sr in zip(llm_right, slm_right, strict=True)]
    gated = [a < b for a, b in zip(llm_loss, slm_loss, strict=True)]
    hits = sum(g and k for g, k in zip(gated, llm_knows, strict=True))
    result = {
        "config": args.config,
        "adapters": str(args.adapters) if args.adapters else None,
        "n": len(aux),
        "llm_aux_loss": statistics.fmean(llm_loss),
        "slm_aux_loss": statistics.fmean(slm_loss),
        "llm_acc": statistics.fmean(llm_right),
        "slm_acc": statistics.fmean(slm_right),
        "gate_to_llm_share": statistics.fmean(gated),
        "llm_knows_better_share": statistics.fmean(llm_knows),
        "gate_precision": hits / max(sum(gated), 1),
        "gate_recall": hits / max(sum(llm_knows), 1),
        "cells": {f"{g} / {r}": n for (g, r), n in sorted(cells.items())},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
