"""What privacy costs in time and bytes, each ratio taken within one run (sides interleaved):

1. DP on the client phase: a client's update (`fine_tune` on a Qwen2.5-0.5B-shaped model of
   `--layers` layers, our default LoRA) with and without what DP adds to it: clipping, and
   the noise share a client draws under secure aggregation (the costlier case; without it
   the client only clips and the server draws one noise for the sum).
2. The masks: one client's mask draws per round (its own mask and one per peer, K in all) at
   the size of the full Qwen2.5-0.5B adapter, ChaCha20 (ours) against Flower's Mersenne
   Twister.
3. A secure round in Flower's simulation with our masks against Flower's own SecAgg+ (the
   ClientApp and the server keep Flower's generator), tiny models: client phase and bytes.

    .venv/bin/python benchmarks/privacy.py --repeats 5
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from pathlib import Path

import torch
from common import add_workload_args, machine, random_model, synthetic_examples, write_figures

from fedcollm.algorithm.client import private_adapter
from fedcollm.algorithm.training import fine_tune
from fedcollm.config import OptimConfig, load_config
from fedcollm.federation import masks, secure_server
from fedcollm.models import get_adapter

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
DP = ["privacy.clip_norm=0.1", "privacy.noise_multiplier=1.0"]


def client_update_seconds(model, examples, args, config) -> tuple[float, float]:
    """One client update's seconds without and with DP's additions (clip + noise share)."""
    broadcast = get_adapter(model)
    start = time.perf_counter()
    fine_tune(
        model,
        examples,
        epochs=1,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=3e-4,
        optim=OptimConfig(),
        pad_id=0,
        seed=0,
    )
    tuned = get_adapter(model)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    private_adapter(tuned, broadcast, config, 1, 0)
    return trained, trained + time.perf_counter() - start


def dp_overhead(args) -> dict:
    model = random_model("qwen2.5-0.5b", args.layers)
    examples = synthetic_examples(
        args.batch_size * args.steps, args.prompt_len, args.answer_len, 1000, seed=0
    )
    secure = ["federation.secure_aggregation=true", "federation.min_clients=2", *DP]
    config = load_config(TINY, overrides=secure)
    client_update_seconds(model, examples, args, config)  # warm-up
    ratios, plain, private = [], [], []
    for _ in range(args.repeats):
        without, with_dp = client_update_seconds(model, examples, args, config)
        plain.append(without)
        private.append(with_dp)
        ratios.append(with_dp / without)
    values = sum(v.numel() for v in get_adapter(model).values())
    return {
        "adapter_values": values,
        "client_update_s": statistics.median(plain),
        "with_dp_s": statistics.median(private),
        "ratios": ratios,
        "ratio": statistics.median(ratios),
    }


def mask_draws(args) -> dict:
    flower = importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils")
    shapes = [tuple(v.shape) for v in get_adapter(random_model("qwen2.5-0.5b", 0)).values()]
    secret = os.urandom(32)
    times = {"chacha20": [], "mersenne": []}
    for _ in range(args.repeats):
        for name, draw in (
            ("chacha20", masks.chacha20_masks),
            ("mersenne", flower.pseudo_rand_gen),
        ):
            start = time.perf_counter()
            for _ in range(args.clients):  # its own mask and one per peer
                draw(secret, 2**32, shapes)
            times[name].append(time.perf_counter() - start)
    return {
        "values": sum(torch.Size(s).numel() for s in shapes),
        **{f"{k}_s": statistics.median(v) for k, v in times.items()},
    }


def flower_masks_app(config):
    """A ClientApp whose SecAgg+ keeps Flower's own generator (for the comparison only)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation import secaggplus_utils

    from fedcollm.federation.client_app import train
    from fedcollm.federation.secure_client import asks_for_secure_aggregation

    app = ClientApp(
        mods=[
            lambda msg, ctx, call_next: (
                _flower_generator(masks.CLIENT_MODULE, secaggplus_utils.pseudo_rand_gen)
                or secaggplus_mod(msg, ctx, call_next)
                if asks_for_secure_aggregation(msg)
                else call_next(msg, ctx)
            )
        ]
    )
    app.train()(lambda msg, context: train(config, msg, context))
    return app


def _flower_generator(module_name: str, generator) -> None:
    importlib.import_module(module_name).pseudo_rand_gen = generator


def secure_round(ours: bool, args) -> list[dict]:
    """benchmarks/secure_aggregation.py's secure run, with our masks or Flower's own."""
    from flwr.common.secure_aggregation import secaggplus_utils
    from secure_aggregation import one_run, tiny_config

    replace = secure_server.replace_generator
    if not ours:  # the server keeps Flower's generator too, or nothing would unmask
        secure_server.replace_generator = lambda name: _flower_generator(
            name, secaggplus_utils.pseudo_rand_gen
        )
    try:
        app = None if ours else flower_masks_app(tiny_config(True, args))
        return one_run(True, args, client_app=app)
    finally:
        secure_server.replace_generator = replace


def masks_in_rounds(args) -> dict:
    ratios, ours_rows, flower_rows = [], [], []
    for repeat in range(args.round_repeats):
        flower, ours = secure_round(False, args), secure_round(True, args)
        ours_rows += ours
        flower_rows += flower
        ratio = statistics.median(r["clients_seconds"] for r in ours) / statistics.median(
            r["clients_seconds"] for r in flower
        )
        ratios.append(ratio)
        print(f"secure round repeat {repeat + 1}: ours / Flower's {ratio:.3f}x", flush=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    return {
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        **{f"ours_{k}": med(ours_rows, k) for k in ("clients_seconds", "up", "down")},
        **{f"flower_{k}": med(flower_rows, k) for k in ("clients_seconds", "up", "down")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, repeats=5, steps=4, steps_help="optimiser steps per client update")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256, help="width of the tiny SLM (part 3)")
    p.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared" / "data"))
    args = p.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    print(f"machine: {machine()}", flush=True)
    dp = dp_overhead(args)
    print(
        f"1. client update ({args.layers} layers, {dp['adapter_values']:,} adapter values): "
        f"{dp['client_update_s']:.2f} s, with DP {dp['with_dp_s']:.3f} s; ratio per repeat "
        f"{', '.join(f'{r:.4f}' for r in dp['ratios'])}; median {dp['ratio']:.4f}x",
        flush=True,
    )
    draws = mask_draws(args)
    print(
        f"2. one client's {args.clients} mask draws per round at {draws['values']:,} values "
        f"(Qwen2.5-0.5B adapter): ChaCha20 {draws['chacha20_s']:.3f} s, Mersenne Twister "
        f"{draws['mersenne_s']:.3f} s",
        flush=True,
    )
    rounds = masks_in_rounds(args)
    print(
        f"3. secure round client phase: ours {rounds['ours_clients_seconds']:.2f} s, Flower's "
        f"{rounds['flower_clients_seconds']:.2f} s; median ratio {rounds['ratio']:.3f}x; "
        f"bytes up {rounds['ours_up']:,.0f} vs {rounds['flower_up']:,.0f}, down "
        f"{rounds['ours_down']:,.0f} vs {rounds['flower_down']:,.0f}",
        flush=True,
    )
    write_figures(args, {"dp": dp, "mask_draws": draws, "secure_rounds": rounds})


if __name__ == "__main__":
    main()
