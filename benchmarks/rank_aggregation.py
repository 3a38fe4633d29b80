"""The server's cost of combining clients of several LoRA ranks (issue 28 §2), and what each
way loses against the exact mean of the clients' models.

theta shaped as the demo SLM's adapter (Qwen2.5-0.5B: LoRA on q, k, v, o of 24 layers) at
rank 16; four clients of ranks 4, 4, 16, 16 with random factors around theta. Times the
per-slice mean (HetLoRA-style, `lora.rank_aggregation = "slices"`) and FlexLoRA (exact mean
product, truncated SVD), median of --repeats, and reports each one's
`lora_aggregation_error`.

    .venv/bin/python benchmarks/rank_aggregation.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedcollm.algorithm.aggregation import aggregation_rule
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.ranks import flexlora, holder_share, pad, per_slice_mean, product_error

# (out, in) of the four projections of one Qwen2.5-0.5B layer.
PROJECTIONS = {
    "q_proj": (896, 896),
    "k_proj": (128, 896),
    "v_proj": (128, 896),
    "o_proj": (896, 896),
}


def theta_and_clients(rank: int, ranks: list[int], layers: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    theta = {}
    for layer in range(layers):
        for name, (out, inp) in PROJECTIONS.items():
            key = f"layers.{layer}.{name}"
            theta[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=generator) * 0.03
            theta[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.01
    clients = [
        pad(
            {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in theta.items()},
            theta,
            r,
        )
        for r in ranks
    ]
    return theta, clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ranks", default="4,4,16,16")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    theta, clients = theta_and_clients(args.rank, ranks)
    rule = aggregation_rule("uniform")
    weights = rule.weights([1] * len(ranks))
    updates = [ClientUpdate(c, 1, 0.0, 1, rank=r) for c, r in zip(clients, ranks, strict=True)]

    def slices():
        share = holder_share(ranks, weights, args.rank)
        return per_slice_mean(rule.aggregate(updates, theta), theta, share)

    def flex():
        return flexlora(clients, weights, ranks, args.rank)

    result = {"rank": args.rank, "ranks": ranks, "values": sum(v.numel() for v in theta.values())}
    torch.set_num_threads(2)
    for name, combine in (("slices", slices), ("flexlora", flex)):
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            aggregate = combine()
            seconds.append(time.perf_counter() - start)
        result[name] = {
            "seconds_median": statistics.median(seconds),
            "seconds": seconds,
            "lora_aggregation_error": product_error(clients, weights, ranks, aggregate),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
