"""Client update throughput: `algorithm.training.fine_tune` against a bare PyTorch + PEFT loop.

Both loops train the same LoRA-wrapped, randomly initialised Qwen2.5-shaped model (`--layers`
of the real width) on the same fixed-length batches: no padding, so both see exactly
B * (prompt_len + answer_len) real tokens per step. The bare loop is the way a PEFT user
writes it: labels = input_ids with -100 outside the answer, `model(..., labels=labels).loss`,
backward, clip_grad_norm_, AdamW (the same max norm, lr, betas and weight decay), zero_grad.
Ours sends only the N = B * answer_len answer positions through the output layer, the bare
loop all B * L positions (full-vocabulary logits), so with a 152k vocabulary and few layers
ours is expected to be faster. Each timed loop includes making its optimiser (fine_tune makes
one per call) and, for ours, collation and one `loss.item()` per step; the bare loop gets its
batches pre-collated and never reads its loss. Each repetition times ours then bare, warm-up
steps first (not timed); reported: tokens/s of each, their ratio per repetition, medians.

Model FLOPs per step, the same count for both loops (what the answer-token loss needs, so MFU
compares like with like): with T = B * L tokens, N_base the non-embedding base weights (the
tied output layer excluded), N_lora the adapter weights, l layers, d = heads * head_dim and
A = B * answer_len answer positions,
    4 * N_base * T               frozen base: forward 2, backward to activations 2, no weight grads
  + 6 * N_lora * T               adapters: forward 2, backward 2, weight grads 2
  + 12 * l * d * L * T           attention scores and values: forward 4 l d L, backward 8 l d L
                                 per token (the full L x L square, as PaLM counts; causal
                                 kernels skip half of it)
  + 4 * V * d_model * A          output layer at the answer positions (frozen: forward, input
                                 grads)
On CUDA, MFU = that / seconds / (--peak-tflops * 1e12); 989 is the H100 SXM bf16 dense peak.

    .venv/bin/python benchmarks/client_throughput.py
    .venv/bin/python benchmarks/client_throughput.py --device cuda --dtype bfloat16 --layers 0
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import (
    DTYPES,
    SHAPES,
    add_workload_args,
    machine,
    random_model,
    synthetic_examples,
    timed,
)

from fedcollm.algorithm.training import fine_tune
from fedcollm.config import OptimConfig
from fedcollm.data import Batch, training_batches

LR, PAD, SEED = 3e-4, 0, 0  # ClientConfig's lr; fixed-length examples never pad


def ours(model, examples, args) -> None:
    fine_tune(
        model,
        examples,
        epochs=1,
        max_steps=0,
        batch_size=args.batch_size,
        lr=LR,
        optim=OptimConfig(),
        pad_id=PAD,
        seed=SEED,
    )


def bare(model, batches: list[Batch]) -> None:
    optim = OptimConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=LR, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
    )
    model.train()
    for batch in batches:
        labels = batch.input_ids.masked_fill(~batch.answer_mask, -100)
        loss = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()


def flops_per_step(model, args) -> float:
    """The model FLOPs of one step; the formula is in the module docstring."""
    config = model.config
    tokens = args.batch_size * (args.prompt_len + args.answer_len)
    embedding = model.get_input_embeddings().weight
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_base = sum(p.numel() for p in model.parameters()) - n_lora - embedding.numel()
    d_attn = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    attention = 12 * config.num_hidden_layers * d_attn * (args.prompt_len + args.answer_len)
    output = 4 * embedding.numel() * args.batch_size * args.answer_len
    return (4 * n_base + 6 * n_lora + attention) * tokens + output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    add_workload_args(p, repeats=5, steps=2, steps_help="optimiser steps per timed loop")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (CUDA only)")
    args = p.parse_args()

    model = random_model(args.shape, args.layers, DTYPES[args.dtype], args.device)
    vocab = model.config.vocab_size
    examples = synthetic_examples(
        args.steps * args.batch_size, args.prompt_len, args.answer_len, vocab, SEED
    )
    # fine_tune's own batches: the same seed gives the same order.
    batches = [b.to(args.device) for b in training_batches(examples, args.batch_size, PAD, 1, SEED)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    flops = flops_per_step(model, args) * args.steps
    results = {"ours": [], "bare": [], "ratio": []}
    ours(model, examples[: args.batch_size], args)  # warm-up
    bare(model, batches[:1])
    for repeat in range(args.repeats):
        t_ours = timed(lambda: ours(model, examples, args), args.device)
        t_bare = timed(lambda: bare(model, batches), args.device)
        results["ours"].append(tokens / t_ours)
        results["bare"].append(tokens / t_bare)
        results["ratio"].append(t_bare / t_ours)
        print(
            f"repeat {repeat + 1}/{args.repeats}: ours {tokens / t_ours:,.0f} tok/s, bare "
            f"{tokens / t_bare:,.0f} tok/s, ours/bare {t_bare / t_ours:.2f}x"
        )

    summary = {
        "machine": machine(),
        "setup": {k: v for k, v in vars(args).items() if k != "json"},
        "tokens_per_loop": tokens,
        "model_flops_per_token": flops / tokens,
        "ours_tokens_per_s": statistics.median(results["ours"]),
        "bare_tokens_per_s": statistics.median(results["bare"]),
        "ratio_per_repeat": results["ratio"],
        "ratio_median": statistics.median(results["ratio"]),
    }
    for name in ("ours", "bare"):
        achieved = summary[f"{name}_tokens_per_s"] * flops / tokens
        summary[f"{name}_tflops"] = achieved / 1e12
        if args.device == "cuda":
            summary[f"{name}_mfu"] = achieved / (args.peak_tflops * 1e12)
    layers = model.config.num_hidden_layers
    print(f"\nmachine: {summary['machine']}")
    print(
        f"{args.shape} x {layers} layers, {args.dtype} on {args.device}, batch "
        f"{args.batch_size} x ({args.prompt_len} + {args.answer_len}) tokens, "
        f"{args.steps} steps per loop, {args.repeats} repeats; "
        f"{flops / tokens / 1e9:.2f} GFLOP/token"
    )
    print("| | tokens/s | TFLOP/s | MFU |")
    print("| --- | ---: | ---: | ---: |")
    for name, label in (("ours", "fedcollm fine_tune"), ("bare", "bare PyTorch + PEFT")):
        mfu = f"{summary[f'{name}_mfu']:.1%}" if args.device == "cuda" else "-"
        print(
            f"| {label} | {summary[f'{name}_tokens_per_s']:,.0f} | "
            f"{summary[f'{name}_tflops']:.3f} | {mfu} |"
        )
    verdict = "meets" if summary["ratio_median"] >= 0.95 else "MISSES"
    print(
        f"ours/bare per repeat: {', '.join(f'{r:.2f}' for r in results['ratio'])}; median "
        f"{summary['ratio_median']:.2f}x ({verdict} the target >= 0.95)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
