"""The server's distillation with clients of two SLM groups against one group's (issue 28 §4).

One round's distillation of `--steps` steps: `MutualDistillation.run` (one group, Algorithm
1) and `distil_groups` with two groups, timed in turn (interleaved, so that load from other
processes hits both alike), `--repeats` times; reported: each repetition's ratio two groups /
one group and their median. What a second group adds per step: its SLM's training step and
its teacher forward; the LLM's forward and backward are made once (expected ratio about
(llm_fb + 2 slm_step) / (llm_fb + slm_step)).

`--memory` runs each variant in a fresh process and reports its peak RSS (ru_maxrss over the
process's life: models, adapters, optimiser states and one round's activations), and the
second group's share of it.

Models: random weights shaped like Qwen2.5-1.5B (LLM) and two Qwen2.5-0.5B (the groups' SLMs:
one tokenizer, so the groups' cost is the structure's; the vocabulary map of a cross-family
group is benchmark 8's), `--layers` decoder layers of the real width (0: full depth).

    .venv/bin/python benchmarks/grouped_distillation.py --repeats 5
    .venv/bin/python benchmarks/grouped_distillation.py --memory
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from common import (
    add_workload_args,
    machine,
    random_model,
    synthetic_examples,
    timed,
    write_figures,
)

from fedcollm.algorithm.distillation import MutualDistillation, distil_groups
from fedcollm.config import DistillConfig, OptimConfig

PAD = 0


def build(args, groups: int):
    """The LLM and `groups` SLMs, each SLM's MutualDistillation sharing the LLM's optimiser."""
    cfg = DistillConfig(kd_steps=args.steps, batch_size=args.batch_size)
    layers = args.layers or None
    llm = random_model("qwen2.5-1.5b", layers, seed=1)
    slms = [random_model("qwen2.5-0.5b", layers, seed=10 + g) for g in range(groups)]
    distillations = [MutualDistillation(llm, slm, cfg, OptimConfig()) for slm in slms]
    for d in distillations[1:]:
        d.llm_optimizer = distillations[0].llm_optimizer
    vocab = min(m.config.vocab_size for m in (llm, *slms))
    data = synthetic_examples(args.batch_size * 2, args.prompt_len, args.answer_len, vocab, 0)
    return distillations, data


def one_round(distillations, data) -> None:
    if len(distillations) == 1:
        distillations[0].run(data, PAD, seed=0)
    else:
        distil_groups(distillations, [data] * len(distillations), [PAD] * len(distillations), 0)


def speed(args) -> dict:
    variants = {g: build(args, g) for g in (1, 2)}
    for d, data in variants.values():  # warm-up
        one_round(d, data)
    ratios = []
    for repeat in range(args.repeats):
        seconds = {
            g: timed(lambda d=d, x=x: one_round(d, x), "cpu") for g, (d, x) in variants.items()
        }
        ratios.append(seconds[2] / seconds[1])
        print(
            f"repeat {repeat + 1}: one group {seconds[1]:.2f} s, two {seconds[2]:.2f} s, "
            f"ratio {ratios[-1]:.2f}",
            flush=True,
        )
    return {"ratios": ratios, "median_ratio": statistics.median(ratios)}


def memory(args) -> dict:
    """Each variant's peak RSS in a fresh process, in GiB."""
    peaks = {}
    for groups in (1, 2):
        command = [sys.executable, __file__, "--peak-of", str(groups), *sys.argv[1:]]
        command.remove("--memory")
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[groups] = json.loads(out.splitlines()[-1])["peak_gib"]
        print(f"{groups} group(s): peak RSS {peaks[groups]:.2f} GiB", flush=True)
    return {"peak_gib": peaks, "second_group_gib": peaks[2] - peaks[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser, repeats=5, steps=2, steps_help="distillation steps per round")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--peak-of", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:  # a child of --memory: one round, then the process's peak
        one_round(*build(args, args.peak_of))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps({"peak_gib": peak}))
        return
    result = memory(args) if args.memory else speed(args)
    write_figures(args, result)
    print(json.dumps({"machine": machine(), "layers": args.layers, "steps": args.steps, **result}))


if __name__ == "__main__":
    main()
