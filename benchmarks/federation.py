"""Benchmarks 4 and 5: bytes on the wire against the adapter payload, and the federation's
own overhead per round, from runs of Flower's simulation engine with tiny models.

Bytes (benchmark 4) are the serialised Flower messages to and from each node as counted by
`wire.MeteredGrid` (`wire_bytes_*` in metrics.jsonl; gRPC framing and HTTP/2 headers come on
top in a deployment), against the adapter's payload, the raw bytes of its arrays
(`bytes_*`). A message also carries a fixed part (metadata, the round's instructions, the
client's metrics and receipt) that does not grow with the adapter; the run measures it, and
the ratio for the demo's SLM (Qwen2.5-0.5B with our default LoRA) is that fixed part plus
the serialised size of a message holding an adapter of exactly that model's shapes.

Overhead (benchmark 5) is a round's wall time (from the previous round's metrics row to this
one's, so Flower's work between rounds and the previous checkpoint count as overhead) minus
the time inside local training (each client's own timer; `client_cpus` = all cores, so
clients run one after another), the aggregation, the distillation and the evaluation. Round
1 carries Ray's start-up and the first model loads and is left out.

    .venv/bin/python benchmarks/federation.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from common import SHAPES, machine
from flwr.app import Message, RecordDict
from flwr.common.serde import message_to_proto
from peft import get_peft_model_state_dict
from transformers import Qwen2Config, Qwen2ForCausalLM

from fedcollm.config import LoraConfig, load_config
from fedcollm.federation.simulation import simulate
from fedcollm.federation.wire import adapter_to_record
from fedcollm.models import add_lora, build_slm, get_adapter

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
INSIDE = ("aggregation", "distillation", "evaluation")


def tiny_config(args, adapter_dtype: str):
    overrides = [
        f"rounds={args.rounds}",
        "eval.limit=8",
        f"federation.client_cpus={os.cpu_count()}",
        f"federation.adapter_dtype={adapter_dtype!r}",
    ]
    return load_config(TINY, overrides=overrides, data_dir=args.data_dir)


def arrays_message_bytes(adapter: dict[str, torch.Tensor], dtype: str) -> int:
    """Serialised size of a message that holds nothing but the adapter."""
    content = RecordDict({"arrays": adapter_to_record(adapter, dtype)})
    return message_to_proto(Message(content, dst_node_id=1, message_type="train")).ByteSize()


def demo_slm_adapter() -> tuple[dict[str, torch.Tensor], int]:
    """Zeros in the shapes of our LoRA on Qwen2.5-0.5B, and that model's own parameter count."""
    with torch.device("meta"):
        model = add_lora(Qwen2ForCausalLM(Qwen2Config(**SHAPES["qwen2.5-0.5b"])), LoraConfig())
    full = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    shapes = get_peft_model_state_dict(model)
    return {k: torch.zeros(v.shape) for k, v in shapes.items()}, full


def one_run(args, dtype: str) -> list[dict]:
    config = tiny_config(args, dtype)
    with tempfile.TemporaryDirectory() as out:
        rows = simulate(config, Path(out))
    measured = []
    # Round 0 only evaluates; round 1 starts Ray and loads the models.
    for before, row in zip(rows[1:-1], rows[2:], strict=True):
        wall = row["seconds"]["since_start"] - before["seconds"]["since_start"]
        training = sum(c["seconds"] for c in row["clients"])
        inside = training + sum(row["seconds"][k] for k in INSIDE)
        clients = row["clients"]
        measured.append(
            {
                "round_seconds": wall,
                "overhead_seconds": wall - inside,
                "down_ratio": statistics.median(
                    c["wire_bytes_received"] / c["bytes_received"] for c in clients
                ),
                "up_ratio": statistics.median(
                    c["wire_bytes_sent"] / c["bytes_sent"] for c in clients
                ),
                "down_wire": statistics.median(c["wire_bytes_received"] for c in clients),
                "up_wire": statistics.median(c["wire_bytes_sent"] for c in clients),
                "payload": clients[0]["bytes_received"],
            }
        )
    return measured


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared" / "data"))
    args = p.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    print(machine())
    tiny_adapter = get_adapter(build_slm(tiny_config(args, "float32"))[0])
    qwen_adapter, qwen_params = demo_slm_adapter()
    qwen_values = sum(v.numel() for v in qwen_adapter.values())
    runs: dict[str, list[dict]] = {"float32": [], "float16": []}
    for repeat in range(args.repeats):
        for dtype in runs:
            rows = one_run(args, dtype)
            runs[dtype] += rows
            overhead, wall = med(rows, "overhead_seconds"), med(rows, "round_seconds")
            print(
                f"repeat {repeat + 1}/{args.repeats} {dtype}: "
                f"overhead {overhead:.3f} s per round of {wall:.2f} s"
            )

    print("\n## Benchmark 5: federation overhead per round (tiny models, rounds 2+)")
    rows = runs["float32"] + runs["float16"]
    worst = max(r["overhead_seconds"] for r in rows)
    print(
        f"median {med(rows, 'overhead_seconds'):.3f} s (max {worst:.3f} s) of a median round "
        f"of {med(rows, 'round_seconds'):.2f} s; target < 1 s"
    )

    print("\n## Benchmark 4: bytes per client per round against the adapter payload")
    print("| adapter | dtype | payload B | to client B | ratio | from client B | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype, rows in runs.items():
        fixed_down = med(rows, "down_wire") - arrays_message_bytes(tiny_adapter, dtype)
        fixed_up = med(rows, "up_wire") - arrays_message_bytes(tiny_adapter, dtype)
        print(
            f"| tiny SLM, {len(tiny_adapter)} arrays (measured) | {dtype} | "
            f"{med(rows, 'payload'):,.0f} | {med(rows, 'down_wire'):,.0f} | "
            f"{med(rows, 'down_ratio'):.4f}x | {med(rows, 'up_wire'):,.0f} | "
            f"{med(rows, 'up_ratio'):.4f}x |"
        )
        payload = qwen_values * (4 if dtype == "float32" else 2)
        arrays = arrays_message_bytes(qwen_adapter, dtype)
        down, up = arrays + fixed_down, arrays + fixed_up
        print(
            f"| Qwen2.5-0.5B, {len(qwen_adapter)} arrays (fixed part measured + arrays "
            f"serialised) | {dtype} | {payload:,} | {down:,.0f} | {down / payload:.4f}x | "
            f"{up:,.0f} | {up / payload:.4f}x |"
        )
    print(
        f"\nQwen2.5-0.5B adapter: {qwen_values:,} of {qwen_params:,} parameters "
        f"({100 * qwen_values / qwen_params:.3f}% of the full SLM; the paper: about 0.24%)"
    )


if __name__ == "__main__":
    main()
