"""The reconstruction audit's floor (issue 29): what the token pursuit scores when it reads
nothing, run on pure Gaussian noise in place of the rows (24 x d, rank 8's q/k/v), told the
same counts as for the audit's batches of configs/audit.toml (client 0's rows for one row
each, all four clients' for the SecAgg views). The pursuit favours common tokens, so this,
not the batch's share of the vocabulary, is the level at which an audit view reads nothing.

    .venv/bin/python benchmarks/reconstruction_floor.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json

import torch

from fedcollm.config import load_config
from fedcollm.data import encode_examples, training_split
from fedcollm.experiments.reconstruction import first_layer_inputs, precision_recall, pursue_tokens
from fedcollm.models import build_slm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/audit.toml")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    config = load_config(args.config, data_dir=args.data_dir)
    slm, tokenizer = build_slm(config)
    questions, split = training_split(config)
    inputs = first_layer_inputs(slm)
    for batch in (1, 4):
        for draw in (0, 1):
            parts = [rows[draw * batch : (draw + 1) * batch] for rows in split.clients]
            examples = [e for p in parts for e in encode_examples(questions, p, tokenizer, config)]
            true = {t for e in examples for t in e.input_ids}
            for seed in (0, 1):
                noise = torch.randn(
                    24, inputs.shape[1], generator=torch.Generator().manual_seed(seed)
                )
                everything = torch.ones_like(noise, dtype=torch.bool)
                chosen = pursue_tokens(inputs, noise, everything, len(true))
                precision = precision_recall(set(chosen), true)[0]
                row = {"batch": batch, "draw": draw, "noise_seed": seed, "tokens": len(true),
                       "precision_on_noise": precision}  # fmt: skip
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
