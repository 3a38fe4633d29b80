"""Cross-family distillation: the vocabulary map's build, and one step against its parts.

`--map` builds the map between Qwen2.5's (151,936 ids) and SmolLM2's (49,152 ids)
vocabularies from scratch, `--repeats` times, each in a fresh cache directory, and reports
the build's wall time, the peak memory of this process during it (VmHWM after a reset
through /proc/self/clear_refs; the tokenizers are loaded before), how many tokens of each
side matched exactly and how many went through the nearest-by-edit-distance search, and the
time to read the cached map back.

Without `--map`: one cross-family `MutualDistillation.run` step (`kd_steps=1`, the batch is
the whole D_a given to it) with each distance ("map", "uld"), timed against the parts it
cannot avoid on the same batches: each model's forward and backward of its answer
cross-entropy (llm_fb, slm_fb), and the eval-mode teacher forwards of both (llm_teacher,
slm_teacher). Two settings of the step: the defaults (Algorithm 1's alternating schedule,
eval-mode teachers: both teacher forwards are part of its floor) and the leanest
(`schedule = "simultaneous"`, `teacher_forward = "shared"`: no extra forward, so its floor
is llm_fb + slm_fb, target <= 1.15x). Interleaved, `--steps` timings per repeat, medians.

Models: random weights shaped like Qwen2.5-1.5B (LLM) and SmolLM2-135M (SLM), `--layers`
decoder layers each (0: the full 28 and 30), our default LoRA. Batch: the first
`--batch-size` questions of `--task` (the demo's vell_fruits), encoded by the two real
tokenizers (fetched once: `fedcollm models --fetch smollm2-135m qwen2.5-coder-1.5b`) and
aligned, or, with `--answer-len`, questions of `--prompt-len` words whose answers are
`--answer-len` words long (about a token per word in both tokenizers).

    .venv/bin/python benchmarks/cross_family.py --map --repeats 3
    .venv/bin/python benchmarks/cross_family.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import add_workload_args, machine, random_model, timed, write_figures
from distillation_step import fb, reset_peak_rss, rss_kib
from transformers import AutoTokenizer

from fedcollm.algorithm.distillation import MutualDistillation, teacher_logits
from fedcollm.config import Config, DistillConfig, OptimConfig
from fedcollm.data import Question, load_questions
from fedcollm.data.alignment import collate_aligned, encode_aligned
from fedcollm.models.loading import model_path
from fedcollm.models.vocabulary import byte_lengths, vocabulary_map

LLM, SLM = "qwen2.5-coder-1.5b", "smollm2-135m"
LLM_SHAPE, SLM_SHAPE = "qwen2.5-1.5b", "smollm2-135m"
WIDTHS = {LLM: 151936, SLM: 49152}
GIB = 2**30
WORDS = "the fruit grows on tall trees and tastes sweet when ripe in late summer".split()


def tokenizers():
    return (AutoTokenizer.from_pretrained(str(model_path(name))) for name in (LLM, SLM))


def map_build(args) -> dict:
    llm_tok, slm_tok = tokenizers()
    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            reset_peak_rss()
            before = rss_kib("VmRSS")
            start = time.perf_counter()
            m = vocabulary_map(llm_tok, slm_tok, WIDTHS[LLM], WIDTHS[SLM], cache=Path(cache))
            seconds = time.perf_counter() - start
            peak = rss_kib("VmHWM")
            start = time.perf_counter()
            vocabulary_map(llm_tok, slm_tok, WIDTHS[LLM], WIDTHS[SLM], cache=Path(cache))
            cached = time.perf_counter() - start
        row = {
            "build_seconds": seconds,
            "peak_rss_gib": peak / 2**20,
            "growth_gib": (peak - before) / 2**20,
            "cached_seconds": cached,
        }
        rows.append(row)
        print(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
        )
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    searched = {
        "llm_tokens_searched": WIDTHS[LLM] - m.exact_llm,
        "slm_tokens_searched": WIDTHS[SLM] - m.exact_slm,
    }
    print(f"\nmachine: {machine()}")
    print(
        f"{LLM} ({WIDTHS[LLM]:,} ids) <-> {SLM} ({WIDTHS[SLM]:,} ids): exact matches "
        f"{m.exact_llm:,} / {m.exact_slm:,}; searched by edit distance "
        f"{searched['llm_tokens_searched']:,} / {searched['slm_tokens_searched']:,} "
        "(ids with no token included)"
    )
    print(
        f"build {medians['build_seconds']:.1f} s (median of {args.repeats}: "
        + ", ".join(f"{r['build_seconds']:.1f}" for r in rows)
        + f"), peak RSS {medians['peak_rss_gib']:.2f} GiB (+{medians['growth_gib']:.2f} GiB "
        f"during the build), cached read {medians['cached_seconds']:.2f} s"
    )
    return {"per_repeat": rows, "median": medians, **searched}


def questions(args) -> list[Question]:
    if args.answer_len:

        def words(n: int, shift: int) -> str:
            return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(n))

        answer = " " + words(args.answer_len, 0)
        return [
            Question(str(i), f"{words(args.prompt_len, i)}\nAnswer:", (answer,), 0, answer)
            for i in range(args.batch_size)
        ]
    return load_questions(args.task, "train", None)[: args.batch_size]


def step_speed(args) -> dict:
    llm_tok, slm_tok = tokenizers()
    vocab = vocabulary_map(llm_tok, slm_tok, WIDTHS[LLM], WIDTHS[SLM])
    qs = questions(args)
    aux = encode_aligned(
        qs,
        range(len(qs)),
        slm_tok,
        llm_tok,
        Config(),
        byte_lengths(slm_tok, WIDTHS[SLM]),
        byte_lengths(llm_tok, WIDTHS[LLM]),
    )
    pads = (slm_tok.pad_token_id, llm_tok.pad_token_id)
    batch = collate_aligned(aux, pads)
    layers = args.layers or None
    llm = random_model(LLM_SHAPE, layers, seed=1)
    slm = random_model(SLM_SHAPE, layers, seed=2)
    steps = {}
    for distance in ("map", "uld"):
        for suffix, schedule, teacher in (
            ("", "alternating", "eval"),
            ("_lean", "simultaneous", "shared"),
        ):
            cfg = DistillConfig(
                kd_steps=1,
                batch_size=len(aux),
                schedule=schedule,
                teacher_forward=teacher,
                cross_tokenizer=distance,
            )
            steps[distance + suffix] = MutualDistillation(llm, slm, cfg, OptimConfig(), vocab)
    llm.train()
    slm.train()
    parts = {
        **{k: (lambda d=d: d.run(aux, pads, 0)) for k, d in steps.items()},
        "llm_fb": lambda: fb(llm, batch.llm),
        "slm_fb": lambda: fb(slm, batch.slm),
        "llm_teacher": lambda: teacher_logits(llm, batch.llm),
        "slm_teacher": lambda: teacher_logits(slm, batch.slm),
    }
    for fn in parts.values():  # warm-up
        fn()
    rows = []
    for repeat in range(args.repeats):
        times = [{k: timed(fn, "cpu") for k, fn in parts.items()} for _ in range(args.steps)]
        row = {k: statistics.median(t[k] for t in times) for k in parts}
        fbs = row["llm_fb"] + row["slm_fb"]
        for distance in ("map", "uld"):
            row[f"{distance}_lean_ratio"] = row[f"{distance}_lean"] / fbs
            row[f"{distance}_ratio"] = row[distance] / (
                fbs + row["llm_teacher"] + row["slm_teacher"]
            )
        rows.append(row)
        print(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v:.3f}{'x' if 'ratio' in k else ' s'}" for k, v in row.items())
        )
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    positions = int(batch.slm.answer_mask[:, 1:].sum()), int(batch.llm.answer_mask[:, 1:].sum())
    print(f"\nmachine: {machine()}")
    print(
        f"{LLM_SHAPE} (LLM) + {SLM_SHAPE} (SLM), {llm.config.num_hidden_layers} and "
        f"{slm.config.num_hidden_layers} layers, batch of {len(aux)}: answer positions "
        f"SLM {positions[0]}, LLM {positions[1]}, aligned {len(batch.slm_rows)}; longest "
        f"SLM / LLM input {batch.slm.input_ids.shape[1]} / {batch.llm.input_ids.shape[1]} tokens"
    )
    print("| | median seconds |")
    print("| --- | ---: |")
    for key in parts:
        print(f"| {key} | {medians[key]:.3f} |")
    for distance in ("map", "uld"):
        for key, label in (
            (f"{distance}_lean_ratio", f"{distance}, lean / (llm_fb + slm_fb), target <= 1.15"),
            (f"{distance}_ratio", f"{distance}, defaults / (both fb + both teacher forwards)"),
        ):
            per = ", ".join(f"{r[key]:.2f}" for r in rows)
            print(f"{label}: {per} per repeat; median {medians[key]:.2f}x")
    return {"per_repeat": rows, "median": medians, "answer_positions": positions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, repeats=3, steps=3, steps_help="timings of each part per repeat")
    p.set_defaults(answer_len=0)
    p.add_argument("--task", default="vell_fruits")
    p.add_argument("--map", action="store_true", help="time and measure the map's build")
    args = p.parse_args()
    figures = map_build(args) if args.map else step_speed(args)
    write_figures(args, figures)


if __name__ == "__main__":
    main()
