"""What can be checked about a run before any model loads or any process starts.

`config/` checks each value on its own; this module checks them against what they point
at: the task and its files, the models, this machine. `fedcollm run` and `fedcollm
experiment` call `check_run`, `check_data` and `check_models` in that order (the last after
registry models are fetched), before Ray starts; the deployed ServerApp calls them too.
Each raises a ConfigError, DataError or ModelError whose one line names the key and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedcollm.config import Config, ConfigError, ModelConfig, profile_slm
from fedcollm.data import (
    DataError,
    DataSplit,
    evaluation_questions,
    get_task,
    is_task_file,
    training_split,
)
from fedcollm.data.tasks import split_files
from fedcollm.models import (
    ModelError,
    architecture,
    check_model_dir,
    looks_like_path,
    model_path,
    resolve_device,
)
from fedcollm.models.loading import tiny_tokenizer
from fedcollm.models.lora import TARGET_MODULES
from fedcollm.models.quantization import check_quantizable
from fedcollm.models.registry import REGISTRY
from fedcollm.models.vocabulary import check_cross_family, same_vocabulary
from fedcollm.registry import AGGREGATIONS


def check_task(config: Config) -> None:
    """The task file read and its keys checked, and the files of the splits a run reads
    there (their rows are read by `check_data`); the error names the key to change."""
    try:
        task = get_task(config.task)
    except DataError as err:
        raise ConfigError(f"task: {err}") from None
    for role, key in (("train", "task"), (config.eval.split, "eval.split")):
        try:
            files = split_files(task, task.spec.split(role), config.data_dir)
        except DataError as err:
            raise ConfigError(f"{key}: {err}") from None
        for path in files if config.data_dir or is_task_file(config.task) else ():
            if not path.is_file():
                where = "data_dir (or --data-dir)" if config.data_dir else "the task file"
                raise ConfigError(
                    f"{'data_dir' if role == 'train' else key}: {path} does not exist; the "
                    f"{task.name} task reads its {role} rows there (relative to {where})"
                )


def model_specs(config: Config) -> list[tuple[str, ModelConfig]]:
    """Every model a run loads, by the config key that sets it: the LLM, the SLM, and the
    SLM of each client profile that names its own (a group, algorithm/groups.py)."""
    specs = [("llm", config.llm), ("slm", config.slm)]
    for i, profile in enumerate(config.client.profiles):
        if profile.slm:
            specs.append((f"client.profiles[{i}].slm", profile_slm(config, profile)))
    return specs


def check_model_names(config: Config) -> None:
    for role, spec in model_specs(config):
        name = spec.name
        if name == "tiny" or name in REGISTRY:
            continue
        if looks_like_path(name) and not (Path(name).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"{role}.name: {name!r} is not a model directory (no config.json there); "
                'give "tiny", a directory saved with save_pretrained, or a hub id'
            )


def check_resources(config: Config, simulated: bool = True) -> None:
    """Devices and, in the simulation engine, the CPU and GPU shares Ray hands out: asking
    for more than there is makes Ray wait for ever."""
    for role, spec in model_specs(config):
        try:
            resolve_device(spec.device)
        except ModelError as err:
            raise ConfigError(f"{role}.device: {err}") from None
    if not simulated:
        return
    cores = os.cpu_count() or 1
    if config.federation.client_cpus > cores:
        raise ConfigError(
            f"federation.client_cpus: {config.federation.client_cpus} is more than the "
            f"{cores} CPU cores here; no simulated client could ever start"
        )
    if config.federation.client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"federation.client_gpus: {config.federation.client_gpus:g}, but PyTorch sees no "
            "CUDA GPU here; set it to 0"
        )


def check_run(config: Config, simulated: bool = True) -> Config:
    """The checks that read no data file and no model: names, paths, this machine."""
    check_task(config)
    check_model_names(config)
    check_resources(config, simulated)
    return config


def check_data(config: Config) -> DataSplit:
    """The training and evaluation rows read and split as the run will read and split them;
    DataError naming the file and line of the first bad row. Returns the split."""
    _, split = training_split(config)
    evaluation_questions(config)
    _check_secagg_weights(config, split)
    return split


def _check_secagg_weights(config: Config, split: DataSplit) -> None:
    """Under SecAgg+, a client whose weight exceeds `secagg_max_weight` refuses to send
    (its masked sum would overflow): a bound below this split's largest client would skip
    every round, so it is refused before anything starts."""
    bound = config.federation.secagg_max_weight
    if not (config.federation.secure_aggregation and bound):
        return
    rule = AGGREGATIONS[config.client.aggregation]()
    largest = max(rule.weight(len(part)) for part in split.clients)
    if largest > bound:
        raise ConfigError(
            f"federation.secagg_max_weight = {bound} is below the largest client's "
            f"aggregation weight {largest:g} ({config.client.aggregation}); set it to at "
            f"least {largest:g}, or 0 for the largest of this split"
        )


def _module_names(architecture) -> set[str]:
    """The names of every module of a model's architecture, built on no device at all."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def _check_targets(config: Config, role: str, name: str, arch) -> None:
    modules = _module_names(arch)
    targets = config.lora.target_modules or TARGET_MODULES.get(arch.model_type)
    if targets is None:
        raise ConfigError(
            f"lora.target_modules: no default for {role}.name {name!r} (architecture "
            f'{arch.model_type!r}); set it, e.g. ["q_proj", "v_proj"]'
        )
    absent = [t for t in targets if t not in modules]
    if absent:
        linear = sorted(m for m in modules if "proj" in m or "attn" in m)[:8]
        raise ConfigError(
            f"lora.target_modules: {', '.join(absent)} not in {role}.name {name!r}; "
            f"it has {', '.join(linear) or 'no projection modules'}"
        )


def _check_chat_template(role: str, name: str) -> None:
    from transformers import AutoTokenizer

    if name == "tiny" or not AutoTokenizer.from_pretrained(model_path(name)).chat_template:
        raise ConfigError(
            f'data.prompt_format: "chat" needs a chat template, and {role}.name {name!r} has '
            'none; use "plain"'
        )


def _tokenizer(spec):
    from transformers import AutoTokenizer

    if spec.name == "tiny":
        return tiny_tokenizer(spec)
    return AutoTokenizer.from_pretrained(str(model_path(spec.name)))


def check_models(config: Config) -> None:
    """Model directories, LoRA target modules and the KL's top-k against the models, read
    from their config files only (registry models must be fetched by now). A hub id has
    nothing here to read before it is loaded."""
    vocab_sizes = []
    for role, spec in model_specs(config):
        if spec.name != "tiny":
            if spec.name not in REGISTRY and not looks_like_path(spec.name):
                continue
            check_model_dir(model_path(spec.name))
        arch = architecture(spec)
        check_quantizable(arch, spec, resolve_device(spec.device))  # before any process starts
        _check_targets(config, role, spec.name, arch)
        if config.data.prompt_format == "chat":
            _check_chat_template(role, spec.name)
        vocab_sizes.append((getattr(arch, "text_config", None) or arch).vocab_size)
    top_k = config.distill.top_k
    specs = [spec for _, spec in model_specs(config)]
    readable = all(s.name == "tiny" or s.name in REGISTRY or looks_like_path(s.name) for s in specs)
    tokenizers = list(map(_tokenizer, specs)) if top_k and readable else []
    if any(not same_vocabulary(tokenizers[0], t) for t in tokenizers[1:]):
        check_cross_family(config.distill)
    if vocab_sizes and top_k > min(vocab_sizes):
        raise ConfigError(
            f"distill.top_k: {top_k} is more than the {min(vocab_sizes)} tokens; lower it"
        )
