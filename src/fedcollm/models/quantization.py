"""Base weights in 4 or 8 bits (bitsandbytes through transformers' BitsAndBytesConfig), as
QLoRA and FlowerTune load them: "nf4" is 4-bit NormalFloat with double quantisation and
bfloat16 compute, "int8" is LLM.int8(). Only the frozen base is quantised: the LoRA adapter
stays float32 in training and on the wire, and its saved format does not change, so an
adapter trained on a 4-bit base loads on a full-precision one (and in lm-eval with `peft=`).
bitsandbytes 0.50 runs both forward and backward on a CPU as well as on CUDA.
"""

from __future__ import annotations

import tempfile
import warnings

import torch

from fedcollm.config import ModelConfig
from fedcollm.errors import ModelError


def bnb_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(spec: ModelConfig, source, local_only: bool, device: torch.device, dtype):
    """`source` (a saved model's directory or a hub id) with its base weights quantised as
    `spec.quantization` says, on `device`, prepared for training adapters on it (peft's
    k-bit preparation: norms and embeddings in float32, inputs that carry gradients)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_quantizable(AutoConfig.from_pretrained(source, local_files_only=local_only), spec, device)
    _quiet_bitsandbytes()
    from peft import prepare_model_for_kbit_training

    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        quantization_config=bnb_config(spec.quantization),
        device_map={"": str(device)},
        local_files_only=local_only,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantize_built(model: torch.nn.Module, spec: ModelConfig, device: torch.device, dtype):
    """A model built in code (a tiny one) quantised the same way, through a saved copy."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return load_quantized(spec, directory, True, device, dtype)


BLOCK = 64  # bitsandbytes' 4-bit block; its CPU kernel needs whole blocks per row


def check_quantizable(architecture, spec: ModelConfig, device: torch.device) -> None:
    """On a CPU, bitsandbytes' 4-bit kernel reshapes each weight into blocks of 64 inputs
    and fails deep inside on other widths: say so first (the preflight, before any process
    starts, and the loader, for models built outside a run)."""
    if spec.quantization != "nf4" or device.type != "cpu":
        return
    widths = {getattr(architecture, k, 0) for k in ("hidden_size", "intermediate_size")}
    if any(w % BLOCK for w in widths):
        raise ModelError(
            f'quantization = "nf4" on a CPU needs hidden_size and intermediate_size that are '
            f"multiples of {BLOCK} (bitsandbytes' CPU kernel); {spec.name} has "
            f'{sorted(widths)}: choose such sizes, "int8", or a CUDA device'
        )


def _quiet_bitsandbytes() -> None:
    """int8 layers warn on every call that they cast their input to float16: expected."""
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    # A saved tiny model has no tokenizer files beside it; peft says so when it loads.
    warnings.filterwarnings("ignore", message="Could not find a config file in")
