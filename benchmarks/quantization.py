"""Base-weight quantisation and bf16 autocast on this CPU (issue 30): a client's training
step on a registry SLM with its base weights in float32, nf4 or int8, and float32 under bf16
autocast: seconds per step (median of --repeats, the settings interleaved so that the
machine's load falls on all alike) and the loss of the first step against float32's.
Memory per setting: benchmarks/memory_plan.py.

    .venv/bin/python benchmarks/quantization.py --data-dir ../shared/data --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import machine

SETTINGS = {
    "float32": [],
    "bf16 autocast": ['slm.autocast="bfloat16"'],
    "nf4": ['slm.quantization="nf4"'],
    "int8": ['slm.quantization="int8"'],
}


def main() -> None:
    from fedcollm.algorithm.training import fine_tune
    from fedcollm.config import load_config
    from fedcollm.data import encode_examples, training_split
    from fedcollm.models import build_slm, get_adapter, set_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/audit.toml")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    clients = {}
    for name, sets in SETTINGS.items():
        config = load_config(args.config, overrides=sets, data_dir=args.data_dir)
        slm, tokenizer = build_slm(config)
        questions, split = training_split(config)
        rows = split.clients[0][: config.client.batch_size]
        examples = encode_examples(questions, rows, tokenizer, config)
        clients[name] = (config, slm, tokenizer, examples, get_adapter(slm))
    seconds = {name: [] for name in SETTINGS}
    first_loss = {}
    for _ in range(args.repeats):
        for name, (config, slm, tokenizer, examples, theta) in clients.items():
            set_adapter(slm, theta)
            start = time.perf_counter()
            result = fine_tune(slm, examples, epochs=1, max_steps=1, batch_size=len(examples),
                               lr=config.client.lr, optim=config.optim,
                               pad_id=tokenizer.pad_token_id, seed=0)  # fmt: skip
            seconds[name].append(time.perf_counter() - start)
            first_loss[name] = result.mean_loss
    rows = [
        {
            "setting": name,
            "step_seconds": statistics.median(seconds[name]),
            "relative_to_float32": statistics.median(seconds[name])
            / statistics.median(seconds["float32"]),
            "first_loss": first_loss[name],
        }  # fmt: skip
        for name in SETTINGS
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "config": args.config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
