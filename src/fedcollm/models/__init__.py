"""Models: loading any causal LM (or a tiny one built in code), LoRA adapters, the offline
registry of pretrained weights."""

from fedcollm.models.forward import eval_mode, has_dropout, output_logits
from fedcollm.models.loading import (
    DTYPES,
    ModelError,
    byte_tokenizer,
    check_model_dir,
    load_model,
    model_device,
    model_path,
    resolve_device,
    tiny_llama,
)
from fedcollm.models.lora import (
    TARGET_MODULES,
    Adapter,
    adapter_digest,
    adapter_numel,
    add_lora,
    build_llm,
    build_slm,
    get_adapter,
    save_adapter,
    set_adapter,
    target_modules,
    tuned_model,
)

__all__ = [
    "DTYPES",
    "TARGET_MODULES",
    "Adapter",
    "ModelError",
    "adapter_digest",
    "adapter_numel",
    "add_lora",
    "build_llm",
    "build_slm",
    "byte_tokenizer",
    "check_model_dir",
    "eval_mode",
    "get_adapter",
    "has_dropout",
    "load_model",
    "model_device",
    "model_path",
    "output_logits",
    "resolve_device",
    "save_adapter",
    "set_adapter",
    "target_modules",
    "tiny_llama",
    "tuned_model",
]
