"""One server mutual-distillation step against the sum of its unavoidable parts.

A step of `MutualDistillation.run` (`kd_steps=1`, so a `run` is one step and also makes its
SLM optimiser and collates its batch), under each schedule that takes one step per batch, is
timed against its parts on the same batch, each timed alone: `answer_loss(model, batch)
.backward()` then zeroing the grads, for the LLM (llm_fb) and for the SLM (slm_fb); and the
SLM's teacher forward under no_grad (slm_teacher). The alternating schedule (Algorithm 1)
needs that forward, because the LLM learns from the SLM's logits after the SLM's update; the
simultaneous one does not, because both learn from the other's logits before the step.
Each schedule runs twice: with eval-mode teachers (`distill.teacher_forward = "eval"`, the
default; one more LLM forward per step, and under "simultaneous" one more SLM forward) and
with the shared train-mode forward as teacher ("shared"). All are timed in turn, `--steps`
times per repetition (interleaved, so that load from other processes hits them alike), and
each repetition takes their medians. Reported per repetition and as medians of those: each
step / (llm_fb + slm_fb) (target <= 1.10), alternating / (llm_fb + slm_fb + slm_teacher),
Algorithm 1's own floor, and each schedule's eval-mode / shared step. What a step adds
beyond the parts:
the two KL and cross-entropy losses, two clip + AdamW steps, the optimiser and batch.

Models: random weights shaped like Qwen2.5-1.5B (LLM) and Qwen2.5-0.5B (SLM), both with
`--layers` decoder layers of the real width (0: the full 28 and 24) and our default LoRA,
on fixed-length synthetic examples (no padding). `kd_loss` and `answer_loss` are vectorised
over positions: one (N, V) matmul, log_softmax, kl_div and cross_entropy for all N answer
positions of the batch; the only Python loop in the step's data path is `collate`'s over the
batch's rows.

`--memory` builds the full-depth pair instead, runs one distillation step and reports the
peak memory: on CUDA `torch.cuda.max_memory_allocated`; on the CPU the process's peak RSS
(ru_maxrss, the whole life of the process) and the peak during the step alone (VmHWM after
resetting it through /proc/self/clear_refs), RSS before and after, and a breakdown:
parameter bytes of each model and the bytes of one answer-position logits tensor,
N x V x 4 (the losses hold a few of them at once). RSS stays near the peak after the step:
glibc keeps the freed activation memory for reuse (malloc_trim hands it back); it is not live.

    .venv/bin/python benchmarks/distillation_step.py --repeats 5
    .venv/bin/python benchmarks/distillation_step.py --memory
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from common import (
    DTYPES,
    SHAPES,
    add_workload_args,
    machine,
    param_bytes,
    random_model,
    synthetic_examples,
    timed,
    write_figures,
)

from fedcollm.algorithm.distillation import MutualDistillation, teacher_logits
from fedcollm.algorithm.training import answer_loss
from fedcollm.config import DistillConfig, OptimConfig
from fedcollm.data import collate

PAD, SEED = 0, 0
SCHEDULES = ("alternating", "simultaneous")
GIB = 2**30


def fb(model, batch) -> None:
    answer_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def rss_kib(field: str) -> int:
    """VmRSS or VmHWM (the peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(args, layers: int | None):
    dtype = DTYPES[args.dtype]
    llm = random_model(args.llm, layers, dtype, args.device, seed=1)
    slm = random_model(args.slm, layers, dtype, args.device, seed=2)
    examples = synthetic_examples(
        args.batch_size, args.prompt_len, args.answer_len, llm.config.vocab_size, SEED
    )
    # Each schedule with eval-mode teachers (the default) and with the shared forward, whose
    # train-mode logits (LoRA dropout on) double as the other model's teacher.
    distillers = {
        schedule + suffix: MutualDistillation(
            llm,
            slm,
            DistillConfig(
                kd_steps=1,
                batch_size=args.batch_size,
                schedule=schedule,
                teacher_forward=teacher_forward,
            ),
            OptimConfig(),
        )
        for schedule in SCHEDULES
        for suffix, teacher_forward in (("", "eval"), ("_shared", "shared"))
    }
    return llm, slm, distillers, examples


def memory(args) -> dict:
    llm, slm, distillers, examples = build(args, None)
    distill = distillers[args.schedule]
    answers = args.batch_size * args.answer_len
    logits = answers * llm.config.vocab_size * 4
    figures = {
        "llm_param_bytes": param_bytes(llm),
        "slm_param_bytes": param_bytes(slm),
        "answer_logits_bytes": logits,
    }

    def one_step() -> float:
        return timed(lambda: distill.run(examples, PAD, SEED), args.device)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        figures["allocated_before"] = torch.cuda.memory_allocated()
        seconds = one_step()
        figures["peak_bytes"] = torch.cuda.max_memory_allocated()
        figures["allocated_after"] = torch.cuda.memory_allocated()
        before, peak = figures["allocated_before"], figures["peak_bytes"]
    else:
        figures["rss_before"] = rss_kib("VmRSS") * 1024
        step_peak = reset_peak_rss()
        seconds = one_step()
        figures["rss_after"] = rss_kib("VmRSS") * 1024
        figures["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if step_peak:
            figures["step_peak_rss"] = rss_kib("VmHWM") * 1024
        before, peak = figures["rss_before"], figures.get("step_peak_rss", figures["ru_maxrss"])
    figures["step_seconds"] = seconds
    params = figures["llm_param_bytes"] + figures["slm_param_bytes"]
    print(f"\nmachine: {machine()}")
    print(
        f"full-depth {args.llm} (LLM) + {args.slm} (SLM), {args.dtype} on {args.device}, "
        f"one step of batch {args.batch_size} x ({args.prompt_len} + {args.answer_len}) "
        f"tokens, {answers} answer positions: {seconds:.1f} s"
    )
    for key, value in figures.items():
        if key != "step_seconds":
            print(f"  {key:22s} {value / GIB:8.3f} GiB")
    print(
        f"peak {peak / GIB:.2f} GiB: parameters {params / GIB:.2f} GiB ({params / peak:.0%}), "
        f"the step's own growth {(peak - before) / GIB:.2f} GiB, of which one N x V fp32 "
        f"logits tensor is {logits / GIB:.3f} GiB; dominant: "
        f"{'parameters' if params > peak / 2 else 'activations and step state'}"
    )
    return figures


def speed(args) -> dict:
    llm, slm, distillers, examples = build(args, args.layers)
    # The one batch of each `run`: the same order, no padding.
    batch = collate(examples, PAD).to(args.device)
    llm.train()
    slm.train()

    parts = {
        **{name: (lambda d=d: d.run(examples, PAD, SEED)) for name, d in distillers.items()},
        "llm_fb": lambda: fb(llm, batch),
        "slm_fb": lambda: fb(slm, batch),
        "slm_teacher": lambda: teacher_logits(slm, batch),
    }
    rows = []
    for fn in parts.values():  # warm-up
        fn()
    for repeat in range(args.repeats):
        times = [{k: timed(fn, args.device) for k, fn in parts.items()} for _ in range(args.steps)]
        row = {k: statistics.median(t[k] for t in times) for k in parts}
        fb_sum = row["llm_fb"] + row["slm_fb"]
        row["alternating_ratio"] = row["alternating"] / fb_sum
        row["alternating_ratio_with_teacher"] = row["alternating"] / (fb_sum + row["slm_teacher"])
        row["simultaneous_ratio"] = row["simultaneous"] / fb_sum
        for schedule in SCHEDULES:  # what eval-mode teachers cost over the shared forward
            row[f"{schedule}_eval_over_shared_ratio"] = row[schedule] / row[f"{schedule}_shared"]
        rows.append(row)
        print(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v:.2f}{'x' if 'ratio' in k else ' s'}" for k, v in row.items())
        )
    medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"\nmachine: {machine()}")
    print(
        f"{args.llm} (LLM) + {args.slm} (SLM) x {llm.config.num_hidden_layers} layers each, "
        f"{args.dtype} on {args.device}, batch {args.batch_size} x ({args.prompt_len} + "
        f"{args.answer_len}) tokens, {args.steps} interleaved timings per repeat, "
        f"{args.repeats} repeats"
    )
    print("| | median seconds |")
    print("| --- | ---: |")
    for key in parts:
        print(f"| {key} | {medians[key]:.3f} |")
    for key, label in (
        ("alternating_ratio", "alternating / (llm_fb + slm_fb), target <= 1.10"),
        ("alternating_ratio_with_teacher", "alternating / (llm_fb + slm_fb + slm_teacher)"),
        ("simultaneous_ratio", "simultaneous / (llm_fb + slm_fb), target <= 1.10"),
        ("alternating_eval_over_shared_ratio", "alternating, eval-mode / shared teachers"),
        ("simultaneous_eval_over_shared_ratio", "simultaneous, eval-mode / shared teachers"),
    ):
        per = ", ".join(f"{r[key]:.2f}" for r in rows)
        print(f"{label}: {per} per repeat; median {medians[key]:.2f}x")
    return {"per_repeat": rows, "median": medians}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--slm", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    add_workload_args(p, repeats=3, steps=3, steps_help="timings of each part per repeat")
    p.add_argument("--memory", action="store_true", help="peak memory of the full-depth pair")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="alternating",
        help="the schedule whose step --memory measures",
    )
    args = p.parse_args()
    figures = memory(args) if args.memory else speed(args)
    write_figures(args, figures)


if __name__ == "__main__":
    main()
