"""The memory plan against measured peaks on this CPU (issue 30): for each case, one fresh
process builds the models of a config and runs one client step (or one round's
distillation, one step long, for the server), and reports its resident memory above what
the process held before the models: after building them and at the step's peak (the peak
counter reset after loading, so the transient of reading weight files is left out). Beside
it, `fedcollm plan`'s prediction for the same phase.

    .venv/bin/python benchmarks/memory_plan.py --data-dir ../shared/data --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import machine

CASES = [  # (name, config, overrides, roles)
    ("tiny", "configs/tiny.toml", [], ("client", "server")),
    ("SmolLM2-135M client", "configs/audit.toml", [], ("client",)),
    ("demo: Qwen 0.5B clients, Qwen 1.5B server", "configs/demo.toml", [], ("client", "server")),
    ("demo, 4-bit LLM", "configs/demo.toml", ['llm.quantization="nf4"'], ("server",)),
    (
        "demo, 4-bit SLM, bf16 autocast",
        "configs/demo.toml",
        ['slm.quantization="nf4"', 'slm.autocast="bfloat16"'],
        ("client",),
    ),
]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def full_length(examples, length: int, answer: int = 8):
    """Rows of exactly `length` tokens (each a real row's tokens repeated), the last `answer`
    of them the answer: the longest batch the config allows, which the plan assumes."""
    from fedcollm.data.encoding import Example

    rows = []
    for e in examples:
        ids = (e.input_ids * (length // len(e.input_ids) + 1))[:length]
        rows.append(Example(ids, [False] * (length - answer) + [True] * answer))
    return rows


def measure(role: str, config_path: str, overrides: list[str], data_dir: str) -> dict:
    """In this process: resident bytes above the baseline once built, and at the peak of
    one step on full-length rows."""
    import gc

    from fedcollm.algorithm.server import CoTuningServer
    from fedcollm.algorithm.training import fine_tune
    from fedcollm.config import load_config
    from fedcollm.data import encode_examples, training_split
    from fedcollm.models import build_slm

    sets = [*overrides, "distill.kd_steps=1"]
    config = load_config(config_path, overrides=sets, data_dir=data_dir)
    length = config.data.max_length
    gc.collect()
    baseline = _status("VmRSS")
    if role == "client":
        slm, tokenizer = build_slm(config)
        questions, split = training_split(config)
        rows = split.clients[0][: config.client.batch_size]
        examples = full_length(encode_examples(questions, rows, tokenizer, config), length)
        lr, pad = config.client.lr, tokenizer.pad_token_id
        step = lambda: fine_tune(slm, examples, epochs=1, max_steps=1,  # noqa: E731
                                 batch_size=len(examples), lr=lr, optim=config.optim,
                                 pad_id=pad, seed=0)  # fmt: skip
    else:
        server = CoTuningServer.from_config(config)  # the configs measured share a tokenizer
        server.aux_data = full_length(server.aux_data[: config.distill.batch_size], length)
        step = lambda: server.co_tune(server.slm_adapter, server_round=1)  # noqa: E731
    gc.collect()
    built = _status("VmRSS") - baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    step()
    return {"built": built, "peak": _status("VmHWM") - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--json")
    parser.add_argument("--measure", nargs=3, metavar=("ROLE", "CONFIG", "OVERRIDES"))
    args = parser.parse_args()
    if args.measure:
        role, config, overrides = args.measure
        print(json.dumps(measure(role, config, json.loads(overrides), args.data_dir)))
        return
    from fedcollm.config import load_config
    from fedcollm.plan import memory_plan

    rows = []
    for name, config_path, overrides, roles in CASES:
        plan = memory_plan(load_config(config_path, overrides=overrides, data_dir=args.data_dir))
        for role in roles:
            command = [sys.executable, __file__, "--data-dir", args.data_dir, "--measure", role,
                       config_path, json.dumps(overrides)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            predicted = plan[role]["total"]
            row = {"case": name, "role": role, "measured_peak": measured["peak"],
                   "measured_built": measured["built"], "predicted_peak": predicted,
                   "error": predicted / measured["peak"] - 1}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
