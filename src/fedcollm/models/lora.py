"""LoRA adapters from `peft`: which modules they wrap, and the adapter as the state dict that
`get_peft_model_state_dict` returns, which is what travels and what is saved."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedcollm import seeds
from fedcollm.config import Config, LoraConfig, ModelConfig
from fedcollm.models.loading import DTYPES, ModelError, load_model, model_device

Adapter = dict[str, torch.Tensor]

# peft calls a transformers method that transformers 5 renamed; harmless, and once per model.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# LoRA on the attention projections. For GPT-2 (c_attn) and OPT (q, k, v, out) with r = 8 this
# gives the paper's adapter sizes: 0.29M of GPT-2-Small's 124M, 3.15M of OPT-1.3B's 1316M.
TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neox": ["query_key_value"],
}


def target_modules(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    if lora.target_modules:
        return lora.target_modules
    model_type = model.config.model_type
    if model_type not in TARGET_MODULES:
        raise ModelError(
            f"no default LoRA target modules for architecture {model_type!r}; "
            'set lora.target_modules, e.g. ["q_proj", "v_proj"]'
        )
    return TARGET_MODULES[model_type]


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> PeftModel:
    """Wrap a model with a fresh LoRA adapter (B = 0, so the wrapped model is unchanged)."""
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(model, lora),
        # GPT-2 stores its projections transposed (Conv1D).
        fan_in_fan_out=model.config.model_type == "gpt2",
        task_type="CAUSAL_LM",
    )
    try:
        tuned = get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"lora.target_modules: {err}") from None
    if lora.variant == "ffa":  # A stays at its (seeded, shared) init: only B trains and travels
        for name, param in tuned.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return tuned


def tuned_model(spec: ModelConfig, lora: LoraConfig, seed: int):
    """A model with a fresh, seeded LoRA adapter, and its tokenizer; run as `spec` says
    (autocast, gradient checkpointing)."""
    model, tokenizer = load_model(spec, seed)
    if spec.gradient_checkpointing:  # non-reentrant: no input needs requires_grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = add_lora(model, lora)
    model.autocast_dtype = DTYPES.get(spec.autocast)  # read by every forward (answer_logits)
    return model, tokenizer


def build_slm(config: Config):
    """The SLM every party holds: the same base weights and initial theta everywhere."""
    return tuned_model(config.slm, config.lora, seeds.slm_weights(config.seed))


def build_llm(config: Config):
    """The server's LLM with a fresh omega. omega never travels, so it keeps plain LoRA
    (A and B trained) whatever `lora.variant` makes of theta."""
    lora = dataclasses.replace(config.lora, variant="lora")
    return tuned_model(config.llm, lora, seeds.llm_weights(config.seed))


def frozen_a(model: PeftModel) -> bool:
    """FFA-LoRA: every A is frozen, so theta is the B matrices alone."""
    return not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def get_adapter(model: PeftModel) -> Adapter:
    """A detached CPU copy of the adapter's trained weights, keyed as PEFT saves them (under
    FFA-LoRA the B matrices only: the frozen A is the same on every party)."""
    state = get_peft_model_state_dict(model)
    skip = "lora_A" if frozen_a(model) else None
    return {k: v.detach().cpu().clone() for k, v in state.items() if not skip or skip not in k}


def set_adapter(model: PeftModel, adapter: Adapter) -> None:
    """Load adapter weights in place; every LoRA tensor is overwritten, or ModelError.

    A partial adapter would leave the missing tensors as they were (stale weights from the
    last client or round), so missing LoRA keys are refused like unexpected ones."""
    device = model_device(model)
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in adapter.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter keys this model does not have: {unexpected[:3]}")
    trained = ("lora_B",) if frozen_a(model) else ("lora_",)
    missing = [k for k in getattr(result, "missing_keys", []) if any(t in k for t in trained)]
    if missing:
        raise ModelError(f"the adapter lacks {len(missing)} LoRA tensors, e.g. {missing[:2]}")


def adapter_digest(adapter: Adapter) -> str:
    """A fingerprint of an adapter's values (fp32), to trace which theta went where."""
    digest = hashlib.sha256()
    for key in sorted(adapter):
        digest.update(key.encode())
        digest.update(adapter[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_numel(adapter: Adapter) -> int:
    return sum(t.numel() for t in adapter.values())


def save_adapter(model: PeftModel, directory: Path) -> None:
    """PEFT format: loadable with `PeftModel.from_pretrained(base_model, directory)`.

    PEFT keeps `target_modules` as a set and writes it in hash order, which differs from
    process to process; sorted, identical runs leave identical files."""
    model.save_pretrained(str(directory))
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_saved_adapter(model: torch.nn.Module, directory: Path) -> PeftModel:
    """A saved PEFT adapter applied to `model`; ModelError saying what is wrong with the
    directory, before PEFT would fall back to the hub or half-load it."""
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"--adapter: {directory} holds no adapter_config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"--adapter: {config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ModelError(f"--adapter: {config_path} is not a PEFT adapter config (no peft_type)")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"--adapter: {directory} holds no adapter_model.safetensors")
    from safetensors.torch import load_file

    try:
        saved = load_file(weights)
    except Exception as err:  # noqa: BLE001 - truncated or garbage: say so, whatever it was
        raise ModelError(f"--adapter: {weights} is damaged ({err})") from None
    try:
        tuned = PeftModel.from_pretrained(model, str(directory))
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"--adapter: {directory} does not fit this model ({first}); is it the adapter "
            "of another base model?"
        ) from None
    loaded = get_peft_model_state_dict(tuned)
    missing = sorted(set(saved) - set(loaded))
    if missing or not loaded:
        raise ModelError(
            f"--adapter: {directory} holds tensors this model has no place for "
            f"({missing[:2]}); is it the adapter of another base model?"
        )
    return tuned
