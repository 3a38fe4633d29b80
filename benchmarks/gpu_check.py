"""The device check (issue 30): on one CUDA GPU, under 10 minutes, from a fresh checkout
(`benchmarks/gpu_check.sh` sets it up and calls this). Phases, each timed, with the peak GPU
memory nvidia-smi saw beside the memory plan's prediction:

1. the demo pair (Qwen2.5-Coder 0.5B clients, 1.5B server) for one round in bf16 autocast,
   four clients sharing the GPU (`federation.client_gpus = 0.25`);
2. the same round with both models' base weights in 4 bits (nf4);
3. the full ARC-Easy validation split (570 questions) scored with the 1.5B model.

Writes one JSON (--out): per phase seconds, tokens per second, MFU against the card's bf16
peak (`--peak-tflops`, 989 for an H100 SXM), peak GPU memory measured and planned. Not yet
run on a GPU: see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
FEDCOLLM = [sys.executable, "-m", "fedcollm.cli"]
BF16 = ['llm.autocast="bfloat16"', 'slm.autocast="bfloat16"']
GPU = ['llm.device="cuda"', 'slm.device="cuda"', "federation.client_gpus=0.25", "rounds=1"]
NF4 = ['llm.quantization="nf4"', 'slm.quantization="nf4"']


class PeakMemory:
    """nvidia-smi's used memory, polled every half second while a phase runs."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            used = subprocess.run(query, capture_output=True, text=True).stdout.split()
            self.peak = max(self.peak, int(used[0]) * 2**20 if used else 0)
            time.sleep(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_phase(name: str, command: list[str]) -> dict:
    print(f"gpu check: {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
    return {
        "phase": name,
        "rc": result.returncode,
        "seconds": seconds,
        "peak_gpu_bytes": memory.peak,
    }


def planned(sets: list[str]) -> dict:
    from fedcollm.config import load_config
    from fedcollm.plan import memory_plan

    plan = memory_plan(load_config(ROOT / "configs" / "demo.toml", overrides=sets))
    return {role: plan[role]["total"] for role in ("server", "client")}


def round_tokens(out: Path, max_length: int) -> tuple[float, int]:
    """(the round's seconds, an upper bound on the tokens its clients and distillation
    trained on: every row of D_k and D_a at the longest length the config allows)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    sizes = json.loads((out / "partition.json").read_text())
    examples = sum(sizes["client_sizes"]) + sizes["aux_size"]
    return rows[-1]["seconds"]["round"], examples * max_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    work = ROOT / "runs" / "gpu_check"
    phases = []
    for name, sets in (("demo round, bf16, 4 clients per GPU", BF16 + GPU),
                       ("demo round, nf4 base weights", BF16 + GPU + NF4)):  # fmt: skip
        out = work / name.split(",")[1].strip().replace(" ", "-")
        command = [*FEDCOLLM, "run", "configs/demo.toml", "--data-dir", args.data_dir,
                   "--out", str(out), *(a for s in sets for a in ("--set", s))]  # fmt: skip
        phase = run_phase(name, command)
        phase["planned_bytes"] = planned(sets)
        if (out / "metrics.jsonl").is_file():
            phase["round_seconds"], tokens = round_tokens(out, max_length=160)
            phase["tokens_per_second"] = tokens / max(phase["round_seconds"], 1e-9)
        phases.append(phase)
    command = [*FEDCOLLM, "evaluate", "--model", "qwen2.5-coder-1.5b", "--task", "arc_easy",
               "--split", "validation", "--data-dir", args.data_dir, "--dtype", "bfloat16",
               "--json"]  # fmt: skip
    phase = run_phase("ARC-Easy validation, 1.5B, bf16", command)
    phase["mfu_note"] = "MFU = 2 x parameters x tokens per second / peak; tokens from the log"
    phases.append(phase)
    for p in phases:
        if "tokens_per_second" in p:  # 6 N FLOPs a trained token, N the 1.5B's: an upper bound
            p["mfu"] = 6 * 1.54e9 * p["tokens_per_second"] / (args.peak_tflops * 1e12)
    report = {"gpu": _gpu_name(), "phases": phases}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _gpu_name() -> str:
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
