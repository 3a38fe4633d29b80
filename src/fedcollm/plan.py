"""The memory plan (`fedcollm plan`): before any model loads, the peak memory of the server
process and of one client, from the models' configs alone (their shapes, built on PyTorch's
meta device, which allocates nothing), per dtype, quantisation, autocast and gradient
checkpointing; and how many simulated clients share one device.

Each process holds its base weights, its trained adapters with their gradients and AdamW's
two moments (float32: 16 bytes a parameter), and at its peak the activations one training
step keeps for its backward pass at the longest batch the config allows (`data.max_length`
tokens a row). Per token and layer a Llama-style decoder with LoRA on the attention keeps
about 5 d + 2 d_kv + 3 d_ff values (the norms' inputs, the projections' shared input,
attention's q, k, v and output, the gated MLP's three intermediates; the frozen MLP weights
need no inputs), 5 d more with LoRA dropout (each adapted projection's dropped input and
mask); every layer's output is also returned (`output_hidden_states`). With gradient
checkpointing only each layer's input stays, plus one layer recomputed. The server's peak is
the larger of the two distillation steps: one model's training step beside the other's
teacher forward (no gradient: its returned hidden states only). Measured against this CPU's
peaks in benchmarks/memory_plan.py (BENCHMARKS.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fedcollm.config import Config, ConfigError, LoraConfig, ModelConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# nf4: two 4-bit codes a byte, an 8-bit absmax per block of 64 (double quantisation), and a
# float32 second-level scale per 256 blocks. int8: a byte and a float32 scale per row.
QUANTISED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
ADAPTER_STATE = 16  # float32 weight, gradient and AdamW's two moments
ANSWER_TOKENS = 8  # answer positions a row sends through the output layer (an upper bound)
# A process's allocations beside the models (tokenizer, batches), and per model it trains
# the step's own (autograd's graph, the allocator's slack): measured on tiny models, where
# nothing else is large (benchmarks/memory_plan.py).
OVERHEAD = 20 * 2**20
STEP_OVERHEAD = 22 * 2**20


@dataclass
class Shapes:
    """What the plan needs of one model."""

    layers: int
    hidden: int
    kv: int  # key/value width (grouped-query attention: narrower than hidden)
    intermediate: int
    vocabulary: int
    base_linear: int  # parameters of the decoder layers' linear maps (what bitsandbytes quantises)
    other: int  # the rest: embeddings, norms, the output layer
    adapter: int  # LoRA parameters at this rank


def shapes(spec: ModelConfig, lora: LoraConfig) -> Shapes:
    """`spec`'s shapes from its config, its model built on the meta device."""
    from transformers import AutoModelForCausalLM

    from fedcollm.models.loading import architecture
    from fedcollm.models.lora import target_modules

    arch = architecture(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
    targets = set(target_modules(model, lora))
    output = model.get_output_embeddings()
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output
    ]
    base_linear = sum(m.weight.numel() for _, m in linears)
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(
        lora.r * (m.in_features + m.out_features)
        for name, m in linears
        if name.rsplit(".", 1)[-1] in targets
    )
    heads = arch.num_attention_heads
    head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // heads
    return Shapes(
        layers=arch.num_hidden_layers,
        hidden=arch.hidden_size,
        kv=getattr(arch, "num_key_value_heads", heads) * head_dim,
        intermediate=arch.intermediate_size,
        vocabulary=arch.vocab_size,
        base_linear=base_linear,
        other=total - base_linear,
        adapter=adapter,
    )


def weight_bytes(shape: Shapes, spec: ModelConfig) -> float:
    """The base weights as loaded: in `dtype`, or quantised (peft's k-bit preparation then
    keeps what is not quantised in float32)."""
    if spec.quantization == "none":
        return (shape.base_linear + shape.other) * BYTES[spec.dtype]
    return shape.base_linear * QUANTISED_BYTES[spec.quantization] + shape.other * 4


def activation_bytes(shape: Shapes, spec: ModelConfig, lora: LoraConfig, rows: int, length: int):
    """What one training step keeps for its backward pass at `rows` x `length` tokens."""
    size = _activation_size(spec)
    tokens = rows * length
    per_layer = 5 * shape.hidden + 2 * shape.kv + 3 * shape.intermediate
    if lora.dropout > 0:
        per_layer += 5 * shape.hidden
    if spec.gradient_checkpointing:
        kept = tokens * (shape.layers * shape.hidden + per_layer) * size
    else:
        kept = tokens * shape.layers * (per_layer + shape.hidden) * size
    return kept + _logits_bytes(shape, rows)


def teacher_bytes(shape: Shapes, spec: ModelConfig, rows: int, length: int) -> float:
    """A forward without gradient: its returned hidden states, one per layer, and logits."""
    size = _activation_size(spec)
    return rows * length * (shape.layers + 1) * shape.hidden * size + _logits_bytes(shape, rows)


def _activation_size(spec: ModelConfig) -> int:
    """Bytes an activation takes: bf16 under autocast, else the model's dtype."""
    return 2 if spec.autocast == "bfloat16" else BYTES[spec.dtype]


def _logits_bytes(shape: Shapes, rows: int) -> float:
    return 3 * rows * ANSWER_TOKENS * shape.vocabulary * 4  # logits, softmax, gradient


def memory_plan(config: Config) -> dict:
    """Bytes per part and in total, for the server process and for one client."""
    length = config.data.max_length
    slm, llm = shapes(config.slm, config.lora), shapes(config.llm, config.lora)
    slm_weights, llm_weights = weight_bytes(slm, config.slm), weight_bytes(llm, config.llm)
    rows = config.distill.batch_size
    slm_step = activation_bytes(slm, config.slm, config.lora, rows, length)
    llm_step = activation_bytes(llm, config.llm, config.lora, rows, length)
    client = {
        "weights": slm_weights,
        "adapter_and_optimiser": slm.adapter * ADAPTER_STATE,
        "activations": activation_bytes(
            slm, config.slm, config.lora, config.client.batch_size, length
        ),
        "overhead": OVERHEAD + STEP_OVERHEAD,
    }
    server = {
        "weights": slm_weights + llm_weights,
        "adapter_and_optimiser": (slm.adapter + llm.adapter) * ADAPTER_STATE,
        "activations": max(
            slm_step + teacher_bytes(llm, config.llm, rows, length),
            llm_step + teacher_bytes(slm, config.slm, rows, length),
        ),
        "overhead": OVERHEAD + 2 * STEP_OVERHEAD,
    }
    for part in (client, server):
        part["total"] = sum(part.values())
    return {"client": client, "server": server, "slm": slm, "llm": llm}


def clients_per_device(plan: dict, device_bytes: float) -> int:
    return int(device_bytes // plan["client"]["total"])


def check_clients_fit(config: Config, device_bytes: float) -> None:
    """Refuse a federation.client_gpus share that packs more clients on a device than its
    memory holds (Ray treats the share as bookkeeping and would start them all)."""
    packed = int(1 / config.federation.client_gpus)
    fit = clients_per_device(memory_plan(config), device_bytes)
    if packed > fit:
        raise ConfigError(
            f"federation.client_gpus = {config.federation.client_gpus:g} packs {packed} "
            f"clients on a GPU of {device_bytes / 2**30:.0f} GiB, which holds {fit} by the "
            f"memory plan (fedcollm plan); set client_gpus to {1 / max(fit, 1):g} or more"
        )


def parse_size(text: str) -> float:
    """'80GiB', '80G', '24GB', '512MiB' or a number of bytes."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ConfigError(f"--device-memory: {text!r} is not a size; write it like 80GiB")
    return float(match[1]) * units[match[2]]


def _on_cpu(spec: ModelConfig) -> bool:
    return spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available())


def plan_table(config: Config, plan: dict, device_bytes: float | None) -> str:
    gib = 2**30
    lines = [
        f"Memory plan (predicted peaks; rows of {config.data.max_length} tokens): server "
        f"{config.llm.name} + {config.slm.name}, clients {config.slm.name}",
        "",
        "| process | base weights | adapters + AdamW | activations (peak step) | other | total |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for role in ("server", "client"):
        part = plan[role]
        cells = [part[k] / gib for k in ("weights", "adapter_and_optimiser", "activations")]
        cells += [part["overhead"] / gib, part["total"] / gib]
        lines.append(f"| {role} | " + " | ".join(f"{c:.2f} GiB" for c in cells) + " |")
    if any(s.quantization != "none" and _on_cpu(s) for s in (config.llm, config.slm)):
        lines += [
            "",
            "Quantised base weights on a CPU: bitsandbytes' CPU path was measured far above",
            "these figures, above even float32's (BENCHMARKS.md section 13). They count what the",
            "4-bit weights take; on CUDA that is not measured yet (section 15).",
        ]
    if device_bytes:
        alone = clients_per_device(plan, device_bytes)
        beside = clients_per_device(plan, max(device_bytes - plan["server"]["total"], 0))
        lines += [
            "",
            f"Simulated clients that fit on a device of {device_bytes / gib:.0f} GiB: {alone} "
            f"on their own, {beside} beside the server",
        ]
    return "\n".join(lines)
