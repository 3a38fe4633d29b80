"""Benchmark 6: wall time and peak memory of `make demo`, by phase, once its models are cached.

Runs, from the repository root, what `make demo` runs (into a temporary output directory):
`FLWR_TELEMETRY_ENABLED=0 .venv/bin/fedcollm run configs/demo.toml --out <tmpdir>`.

    .venv/bin/python benchmarks/demo_profile.py --json demo.json --plot demo.png

Memory: every 0.2 s, the sum of PSS (shared pages split between the processes mapping them)
over the process tree, i.e. the command and Ray's GCS, raylet and workers; the RSS sum beside
it counts the pages the workers share once each. Flower starts Ray beside the ServerApp, so
Ray's start-up overlaps model loading and round 0: the plot counts the processes too.

Phases: the run's lines, timestamped as they arrive, and each round's `seconds` in
metrics.jsonl. Start-up until `fedcollm run:`; Flower and Ray imports until `loading the
server LLM`; model loading until round 0's evaluation; per round the clients (from the last
round's line, so round 1 holds the workers loading the SLM), aggregation and distillation,
and evaluation with the checkpoint up to the round's line; final save until `adapters:`; exit.

The one-time download and conversion of the models is left out by design: the registry models
the config names must already be in $FEDCOLLM_CACHE/models (else ~/.cache/fedcollm/models),
as the first `make demo` leaves them; the script stops if they are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedcollm.config import load_config
from fedcollm.models.registry import REGISTRY, model_dir
from fedcollm.tracking.metrics import read_metrics

ROUND_LINE = re.compile(r"^round (\d+)/\d+ \|")
GIB = 2**30


def check_models(args) -> None:
    config = load_config(args.config, overrides=args.set, data_dir=args.data_dir)
    for name in {config.llm.name, config.slm.name} & set(REGISTRY):
        if not (model_dir(name) / "config.json").is_file():
            sys.exit(
                f"error: {model_dir(name)} holds no converted model; this benchmark leaves "
                f"out the one-time download: run `make demo` once first"
            )


def tree_memory(root: psutil.Process) -> tuple[int | None, int, int]:
    """PSS (None if one is unreadable) and RSS in bytes, summed over `root` and its
    descendants, and how many processes they are."""
    pss, rss, procs = 0, 0, [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # ZombieProcess included
            try:
                info = proc.memory_full_info()
            except psutil.AccessDenied:
                info = proc.memory_info()
            pss = pss + info.pss if pss is not None and hasattr(info, "pss") else None
            rss += info.rss
    return pss, rss, len(procs)


def run(command: list[str]) -> tuple[list, list, float]:
    """Run `command`, echoing its output; its timestamped lines, memory samples, wall time."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        command, env=env, text=True, bufsize=1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    root, samples, lines, done = psutil.Process(proc.pid), [], [], threading.Event()

    def sample() -> None:
        while not done.wait(0 if not samples else 0.2):
            try:
                samples.append((time.monotonic() - t0, *tree_memory(root)))
            except psutil.NoSuchProcess:
                return

    sampler = threading.Thread(target=sample)
    sampler.start()
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
        print(f"{lines[-1][0]:7.1f}s | {lines[-1][1]}", flush=True)
    proc.wait()
    wall = time.monotonic() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"error: the run failed with exit status {proc.returncode} (output above)")
    return lines, samples, wall


def phases(lines: list, rows: list[dict], wall: float) -> list[tuple[str, float, float]]:
    """(name, start, end) in seconds since launch, contiguous from 0 to `wall`."""

    def first(prefix: str) -> float:
        return next(t for t, text in lines if text.startswith(prefix))

    round_at = {int(m[1]): t for t, text in lines if (m := ROUND_LINE.match(text))}
    run_at, loading_at = first("fedcollm run:"), first("loading the server LLM")
    out = [
        ("start-up: imports, config, data", 0.0, run_at),
        ("Flower and Ray imports", run_at, loading_at),
    ]
    previous = loading_at
    for row in rows:
        n, s, end = row["round"], row["seconds"], round_at[row["round"]]
        begin = end - s["round"]  # the round's broadcast (round 0: its evaluation)
        clients_end = begin + s.get("clients", 0.0)
        distill_end = clients_end + s.get("aggregation", 0.0) + s.get("distillation", 0.0)
        if n == 0:
            out.append(("server loads LLM and SLM", previous, begin))
        else:
            out.append((f"round {n}: clients", previous, clients_end))
            out.append((f"round {n}: aggregation + distillation", clients_end, distill_end))
        out.append((f"round {n}: evaluation + checkpoint", distill_end, end))
        previous = end
    save_at = first("adapters:")
    out += [("final save and report", previous, save_at), ("exit: Ray shuts down", save_at, wall)]
    return out


def peak(samples: list, start: float, end: float) -> float:
    """Highest sample in [start, end], else (a phase shorter than 0.2 s) the last before."""
    inside = [m for t, m, _, _ in samples if start <= t <= end]
    return max(inside or [m for t, m, _, _ in samples if t <= end][-1:] or [0]) / GIB


def plot(path: str, samples: list, table: list, measure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    times = [s[0] for s in samples]
    ax.plot(times, [s[1] / GIB for s in samples], color="C0", label=f"{measure} sum")
    if measure != "RSS":
        ax.plot(times, [s[2] / GIB for s in samples], color="C0", alpha=0.35, label="RSS sum")
    total = table[-1][2]
    for i, (name, start, end) in enumerate(table):
        ax.axvspan(start, end, color="0.9" if i % 2 else "white", zorder=0)
        ax.axvline(start, color="0.6", linewidth=0.6)
        if end - start > 0.012 * total:
            ax.text(
                (start + end) / 2,
                0.98,
                name,
                rotation=90,
                fontsize=7,
                ha="center",
                va="top",
                transform=ax.get_xaxis_transform(),
            )
    count = ax.twinx()
    count.step(times, [s[3] for s in samples], where="post", color="C1", linewidth=0.8)
    count.set(ylim=(0, None), ylabel="processes in the tree (orange)")
    ax.set(xlim=(0, total), ylim=(0, None), xlabel="seconds since launch", ylabel="GiB")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--data-dir", help="passed on to `fedcollm run`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the phases, totals and samples here")
    p.add_argument("--plot", help="write a PNG of memory over time here")
    args = p.parse_args()
    check_models(args)
    with tempfile.TemporaryDirectory(prefix="demo-profile-") as out:
        command = [
            str(Path(sys.executable).with_name("fedcollm")),
            "run",
            args.config,
            "--out",
            out,
            *(["--data-dir", args.data_dir] if args.data_dir else []),
            *[word for value in args.set for word in ("--set", value)],
        ]
        print("$ FLWR_TELEMETRY_ENABLED=0 " + " ".join(command), flush=True)
        lines, samples, wall = run(command)
        rows = read_metrics(Path(out) / "metrics.jsonl")
    measure = "PSS" if all(s[1] is not None for s in samples) else "RSS"
    samples = [(t, rss if measure == "RSS" else pss, rss, n) for t, pss, rss, n in samples]
    table = phases(lines, rows, wall)
    result = {
        "command": command,
        "memory": measure,
        "phases": [
            {
                "phase": name,
                "start": start,
                "seconds": end - start,
                "peak_gib": peak(samples, start, end),
            }
            for name, start, end in table
        ],
        "total_seconds": wall,
        "peak_gib": max(s[1] for s in samples) / GIB,
        "peak_rss_gib": max(s[2] for s in samples) / GIB,
        "samples": [
            {"t": t, measure.lower(): m, "rss": r, "processes": n} for t, m, r, n in samples
        ],
    }
    print(f"\n{'phase':<36} {'seconds':>8} {'peak ' + measure + ' GiB':>13}")
    for row in result["phases"]:
        print(f"{row['phase']:<36} {row['seconds']:>8.1f} {row['peak_gib']:>13.2f}")
    print(f"{'total':<36} {wall:>8.1f} {result['peak_gib']:>13.2f}")
    print(
        f"\nmemory: {measure} summed over the process tree, sampled every 0.2 s "
        f"({len(samples)} samples); peak RSS sum {result['peak_rss_gib']:.2f} GiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(args.plot, samples, table, measure)


if __name__ == "__main__":
    main()
