"""Task files in lm-evaluation-harness's format, read without lm-eval.

A task file is YAML with lm-eval's keys (`dataset_path`, `dataset_kwargs.data_files`,
`doc_to_text`, `doc_to_choice`, `doc_to_target`, `output_type`, `generation_kwargs`,
`metric_list`, the splits, `target_delimiter`, `include`, `!function`). This module reads
the file and checks its keys; `templates.py` turns rows into prompts as lm-eval does. The
reader is our own because lm-eval as a library costs 17 s before its first task (9 s to
import, 7 s to index its own 10,000 task files) and about fifteen more packages; lm-eval stays
the reference the tests compare against.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedcollm.data.rows import DataError
from fedcollm.registry import METRICS

OUTPUT_TYPES = ("multiple_choice", "generate_until")
# lm-eval's TaskConfig keys that fedcollm reads.
READ_KEYS = {
    "task",
    "task_alias",
    "tag",
    "group",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "custom_dataset",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "process_docs",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "output_type",
    "generation_kwargs",
    "metric_list",
    "metadata",
    "num_fewshot",
    "repeats",
    "should_decontaminate",
    "doc_to_decontamination_query",
    "include",
    "unsafe_code",
}
# lm-eval keys fedcollm cannot honour yet: refused rather than silently ignored.
UNSUPPORTED_KEYS = {
    "filter_list": "fedcollm takes the generation as it is (lm-eval's take_first)",
    "process_results": "fedcollm computes the metrics of metric_list itself",
    "use_prompt": "write the prompt as doc_to_text",
    "gen_prefix": "put the prefix at the end of doc_to_text",
    "fewshot_config": "fedcollm scores zero-shot",
    "doc_to_image": "fedcollm tasks are text only",
    "doc_to_audio": "fedcollm tasks are text only",
}
# The metrics a task scores when its file lists none. Every metric is a registration
# (`evaluation/metrics.py`): name, output type, direction, options.
DEFAULT_METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate_until": ("exact_match",)}
# Keys of a metric_list entry that are not the metric's own options.
METRIC_ENTRY_KEYS = {"metric", "aggregation", "higher_is_better"}


@dataclass(frozen=True)
class Metric:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskFile:
    """A task file's settings, checked; the templates stay as written."""

    name: str
    path: Path
    output_type: str
    dataset_path: str
    dataset_name: str | None
    data_files: dict[str, list[str]]
    custom_dataset: Callable | None
    splits: dict[str, str]  # role ("train", "validation", "test") -> split name
    process_docs: Callable | None
    doc_to_text: Any
    doc_to_choice: Any
    doc_to_target: Any
    description: str
    target_delimiter: str
    until: tuple[str, ...]
    max_gen_toks: int
    metrics: tuple[Metric, ...]

    @property
    def generative(self) -> bool:
        return self.output_type == "generate_until"

    def split(self, role: str) -> str:
        if role not in self.splits:
            raise DataError(
                f"{self.path}: task {self.name} has no {role} split (no "
                f"{_ROLE_KEYS[role]}); give it one, or use a split it has: "
                f"{', '.join(self.splits) or 'none'}"
            )
        return self.splits[role]


_ROLE_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


class _Function:
    """`!function module.name`: a Python function from a file beside the task file."""

    def __init__(self, spec: str) -> None:
        self.spec = spec


def _function_tag(loader: yaml.SafeLoader, node: yaml.Node) -> _Function:
    return _Function(loader.construct_scalar(node))


# A task file is small; YAML aliases (*name) can nest a few hundred bytes into billions of
# values ("billion laughs"), which grow without end wherever they are walked.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values the node stands for once every alias is written out."""
    if id(node) not in sizes:
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        sizes[id(node)] = 0  # a recursive alias counts once
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


class _Loader(yaml.SafeLoader):
    def compose_document(self):
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise yaml.YAMLError(
                f"its aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values; "
                "write the values out"
            )
        return node


_Loader.add_constructor("!function", _function_tag)


def _resolve_function(value: _Function, folder: Path, key: str, path: Path) -> Callable:
    """The function `!function module.name` names, from `module.py` in the task file's own
    folder (or a folder below it: `sub.module.name`). A task file's helpers are code that
    runs as the user; nothing outside the task's folder is ever loaded."""
    module_name, _, name = value.spec.rpartition(".")
    parts = module_name.split(".")
    if not all(part.isidentifier() for part in parts) or not name.isidentifier():
        raise DataError(
            f"{path}: {key}: !function {value.spec!r} is not module.function; name a module "
            "in the task file's folder, e.g. !function utils.process_docs"
        )
    module_file = folder.joinpath(*parts).with_suffix(".py")
    if not module_file.resolve().is_relative_to(folder.resolve()):
        raise DataError(
            f"{path}: {key}: !function {value.spec} leads outside the task file's folder; "
            "put the module beside the task file"
        )
    if not module_file.is_file():
        raise DataError(
            f"{path}: {key}: !function {value.spec} needs {module_file}; put the module beside "
            "the task file"
        )
    spec = importlib.util.spec_from_file_location(f"fedcollm_task_{module_name}", module_file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module, whatever it raised
        line = f" line {err.lineno}" if isinstance(err, SyntaxError) else ""
        raise DataError(
            f"{path}: {key}: {module_file}{line} fails to load ({type(err).__name__}: "
            f"{getattr(err, 'msg', err)}); fix the module"
        ) from None
    if not callable(getattr(module, name, None)):
        raise DataError(f"{path}: {key}: {module_file} defines no function {name!r}")
    return getattr(module, name)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's keys over those of the file it includes (lm-eval's `include`), with every
    `!function` resolved against the folder of the file that names it."""
    if path in seen:
        raise DataError(f"{path}: includes itself (through {seen[-1]}); remove the loop")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check the task path") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the task file as UTF-8") from None
    try:
        values = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise DataError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise DataError(f"{path}: a task file is a YAML mapping of lm-eval task keys")
    values = {
        k: _resolve_function(v, path.parent, k, path) if isinstance(v, _Function) else v
        for k, v in values.items()
    }
    if "include" in values:
        base = _read_yaml(path.parent / str(values.pop("include")), (*seen, path))
        values = {**base, **values}
    return values


def _data_files(value: Any, path: Path) -> dict[str, list[str]]:
    """`dataset_kwargs.data_files` as datasets reads it: a file, a list (both the "train"
    split) or a mapping of split to file or files."""
    if value is None:
        return {}
    if isinstance(value, str | list):
        value = {"train": value}
    if not isinstance(value, dict):
        raise DataError(f"{path}: dataset_kwargs.data_files must map split names to files")
    files = {}
    for split, names in value.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"{path}: dataset_kwargs.data_files.{split} must be a file path")
        files[str(split)] = names
    return files


def _metrics(entries: Any, output_type: str, path: Path) -> tuple[Metric, ...]:
    if entries is None:
        return tuple(Metric(m) for m in DEFAULT_METRICS[output_type])
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: metric_list must be a list of {{metric: NAME}} entries")
    metrics = []
    for entry in entries:
        name = entry.get("metric") if isinstance(entry, dict) else None
        allowed = [n for n, spec in METRICS.items() if spec.output_type == output_type]
        if name not in allowed:
            raise DataError(
                f"{path}: metric_list: {name!r} is not a metric fedcollm computes for "
                f"{output_type}; use {', '.join(allowed)}"
            )
        spec = METRICS[name]
        options = {k: v for k, v in entry.items() if k not in METRIC_ENTRY_KEYS}
        unknown = set(options) - spec.options
        if unknown:
            raise DataError(
                f"{path}: metric_list: {name} has no option {sorted(unknown)[0]!r}; "
                f"its options: {', '.join(sorted(spec.options)) or 'none'}"
            )
        said = entry.get("higher_is_better", spec.higher_is_better)
        if said is not spec.higher_is_better:
            raise DataError(
                f"{path}: metric_list: {name} has higher_is_better: "
                f"{str(spec.higher_is_better).lower()}; remove the key or set it so"
            )
        if entry.get("aggregation", spec.aggregation) != spec.aggregation:
            raise DataError(
                f"{path}: metric_list: {name} aggregates by {spec.aggregation!r} over "
                f"questions; remove the key or set it so"
            )
        metrics.append(Metric(name, options))
    return tuple(metrics)


def _generation(values: dict[str, Any], output_type: str, path: Path) -> tuple[tuple, int]:
    """`until` and `max_gen_toks` with lm-eval's defaults: the few-shot delimiter, 256."""
    kwargs = values.get("generation_kwargs")
    if kwargs is not None and output_type != "generate_until":
        raise DataError(f"{path}: generation_kwargs needs output_type: generate_until")
    if not isinstance(kwargs or {}, dict):
        raise DataError(f"{path}: generation_kwargs must be a mapping of lm-eval's keys")
    kwargs = dict(kwargs or {})
    temperature = kwargs.get("temperature", 0) or 0
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        raise DataError(f"{path}: generation_kwargs.temperature must be a number (0: greedy)")
    if kwargs.get("do_sample") or temperature > 0:
        raise DataError(f"{path}: generation_kwargs: fedcollm decodes greedily; drop do_sample")
    until = kwargs.get("until", [values.get("fewshot_delimiter", "\n\n")])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise DataError(f"{path}: generation_kwargs.until must be a string or list of strings")
    max_gen_toks = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256))
    if not isinstance(max_gen_toks, int) or isinstance(max_gen_toks, bool) or max_gen_toks < 1:
        raise DataError(f"{path}: generation_kwargs.max_gen_toks must be a positive integer")
    return tuple(until), max_gen_toks


# A task's name names its results' directory (runs/<task>/...): a name, never a path.
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


def _task_name(value: Any, path: Path) -> str:
    name = str(value if value is not None else path.stem)
    if not TASK_NAME.fullmatch(name) or set(name) == {"."}:
        raise DataError(
            f"{path}: task: {name!r} is not a task name; use letters, digits, '_', '-', '.' "
            "and '+' only (it names the task's results directory)"
        )
    return name


def read_task_file(path: str | Path) -> TaskFile:
    """The task file at `path`, its keys checked against lm-eval's; DataError names the key."""
    path = Path(path).expanduser().resolve()
    values = _read_yaml(path)
    for key in values:
        if key in UNSUPPORTED_KEYS:
            raise DataError(f"{path}: {key} is not supported; {UNSUPPORTED_KEYS[key]}")
        if key not in READ_KEYS:
            raise DataError(f"{path}: unknown key {key!r}; a task file has lm-eval's task keys")
    if values.get("num_fewshot") not in (None, 0):
        raise DataError(f"{path}: num_fewshot: fedcollm scores zero-shot; set it to 0")
    if values.get("repeats", 1) != 1:
        raise DataError(f"{path}: repeats: fedcollm decodes greedily once; set it to 1")
    output_type = values.get("output_type", "generate_until")  # lm-eval's default
    if output_type not in OUTPUT_TYPES:
        raise DataError(
            f"{path}: output_type {output_type!r} is not supported; use {' or '.join(OUTPUT_TYPES)}"
        )
    for key in ("doc_to_text", "doc_to_target"):
        if values.get(key) is None:
            raise DataError(f"{path}: {key} is missing; give a field name or a Jinja template")
    if output_type == "multiple_choice" and values.get("doc_to_choice") is None:
        raise DataError(f"{path}: doc_to_choice is missing; a multiple_choice task needs choices")
    kwargs = values.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"data_files"}:
        raise DataError(f"{path}: dataset_kwargs: fedcollm reads only data_files from it")
    data_files = _data_files(kwargs.get("data_files"), path)
    if not (values.get("dataset_path") or values.get("custom_dataset")):
        raise DataError(f"{path}: dataset_path is missing; for local files use dataset_path: json")
    splits = {role: str(values[key]) for role, key in _ROLE_KEYS.items() if values.get(key)}
    if "validation" not in splits and "test" not in splits:
        raise DataError(f"{path}: no validation_split or test_split; name the split to score")
    until, max_gen_toks = _generation(values, output_type, path)
    delimiter = values.get("target_delimiter", " ")
    return TaskFile(
        name=_task_name(values.get("task"), path),
        path=path,
        output_type=output_type,
        dataset_path=str(values.get("dataset_path") or ""),
        dataset_name=values.get("dataset_name"),
        data_files=data_files,
        custom_dataset=values.get("custom_dataset"),
        splits=splits,
        process_docs=values.get("process_docs"),
        doc_to_text=values["doc_to_text"],
        doc_to_choice=values.get("doc_to_choice"),
        doc_to_target=values["doc_to_target"],
        description=str(values.get("description") or ""),
        target_delimiter=str(delimiter),
        until=until,
        max_gen_toks=max_gen_toks,
        metrics=_metrics(values.get("metric_list"), output_type, path),
    )
