"""Models: loading any causal LM (or a tiny one built in code), LoRA adapters, the offline
registry of pretrained weights. Names load with their module on first use: listing the
registry needs no torch."""

from fedcollm.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "forward": ["answer_logits", "eval_mode", "has_dropout", "output_logits"],
        "loading": [
            "DTYPES",
            "ModelError",
            "architecture",
            "byte_tokenizer",
            "check_model_dir",
            "load_model",
            "looks_like_path",
            "model_device",
            "model_path",
            "resolve_device",
            "tiny_llama",
        ],
        "lora": [
            "TARGET_MODULES",
            "Adapter",
            "adapter_digest",
            "adapter_numel",
            "add_lora",
            "build_llm",
            "build_slm",
            "get_adapter",
            "save_adapter",
            "set_adapter",
            "target_modules",
            "tuned_model",
        ],
    },
)
