"""What SecAgg+ costs: time of the client phase and bytes per client per round, with and
without `federation.secure_aggregation`, in Flower's simulation engine.

The client phase is the round's wall time from broadcast to aggregate: local training plus,
with SecAgg+, its four stages (key setup, share exchange, masked upload, unmasking). Bytes
are the serialised Flower messages to and from each node (`wire_bytes_*` in metrics.jsonl).
Round 1 carries Ray's start-up and is left out; the figures are medians over the other
rounds of all repetitions, and the ratios are taken within one repetition.

    .venv/bin/python benchmarks/secure_aggregation.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

from fedcollm.config import load_config
from fedcollm.federation.simulation import simulate

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def tiny_config(secure: bool, args):
    overrides = [
        f"rounds={args.rounds}",
        f"num_clients={args.clients}",
        "eval.limit=4",
        f"slm.tiny.hidden_size={args.hidden}",
        f"slm.tiny.intermediate_size={2 * args.hidden}",
        f"federation.secure_aggregation={str(secure).lower()}",
        "federation.min_clients=2",
    ]
    return load_config(TINY, overrides=overrides, data_dir=args.data_dir)


def one_run(secure: bool, args, client_app=None) -> list[dict]:
    """Rounds 2.. of one tiny run (round 1 carries Ray's start-up), `client_app` if given."""
    config = tiny_config(secure, args)
    with tempfile.TemporaryDirectory() as out:
        rows = simulate(config, Path(out), client_app=client_app)
    return [
        {
            "clients_seconds": row["seconds"]["clients"],
            "train_seconds": max(c["seconds"] for c in row["clients"]),
            "up": statistics.median(c["wire_bytes_sent"] for c in row["clients"]),
            "down": statistics.median(c["wire_bytes_received"] for c in row["clients"]),
            "params": row["adapter_params"],
        }
        for row in rows[2:]  # round 1 includes Ray's start-up
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256, help="width of the tiny SLM")
    p.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared" / "data"))
    args = p.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    ratios, plain_rows, secure_rows = [], [], []
    for repeat in range(args.repeats):
        plain, secure = one_run(False, args), one_run(True, args)
        plain_rows += plain
        secure_rows += secure
        ratio = statistics.median(s["clients_seconds"] for s in secure) / statistics.median(
            r["clients_seconds"] for r in plain
        )
        ratios.append(ratio)
        print(f"repeat {repeat + 1}/{args.repeats}: client phase secure/plain {ratio:.2f}x")

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    params = plain_rows[0]["params"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(
        f"\nmachine: {machine}; {args.clients} clients, adapter of {params:,} values "
        f"({4 * params:,} B in fp32)"
    )
    print("| | plain | SecAgg+ | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (
        ("clients_seconds", "client phase per round (s)"),
        ("train_seconds", "local training per client (s)"),
    ):
        a, b = med(plain_rows, key), med(secure_rows, key)
        print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    extra = med(secure_rows, "clients_seconds") - med(plain_rows, "clients_seconds")
    print(f"| SecAgg+ overhead per round (s) | | {extra:.2f} | |")
    for key, label in (("up", "bytes client → server"), ("down", "bytes server → client")):
        a, b = med(plain_rows, key), med(secure_rows, key)
        print(f"| {label} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
    print(
        f"\nclient phase ratio per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f}x"
    )


if __name__ == "__main__":
    main()
