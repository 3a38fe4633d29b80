"""Config validation: every problem is a ConfigError that names the key and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcollm.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    load_config,
)
from fedcollm.data import TASKS
from fedcollm.models import ModelError, load_model, resolve_device
from fedcollm.preflight import check_run


def checked(values: dict) -> Config:
    """A config as `fedcollm run` takes it: each value checked, then against data and models."""
    return check_run(config_from_dict(values))


def write_toml(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid():
    config = config_from_dict({})
    assert config == Config()
    assert config.to_dict()["client"]["lr"] == pytest.approx(3e-4)


def test_valid_file_is_read(tmp_path):
    path = write_toml(
        tmp_path,
        'rounds = 5\nnum_clients = 4\ntask = "openbookqa"\n'
        "[client]\nlr = 1e-4\nbatch_size = 8\n"
        '[llm]\nname = "tiny"\ntiny = { hidden_size = 32, num_layers = 1 }\n',
    )
    config = load_config(path)
    assert (config.rounds, config.num_clients, config.task) == (5, 4, "openbookqa")
    assert config.client.lr == pytest.approx(1e-4)
    assert config.client.batch_size == 8
    assert config.llm.tiny.hidden_size == 32
    assert config.llm.tiny.num_layers == 1
    assert config.llm.tiny.num_heads == 4  # untouched default


# --- unknown keys -------------------------------------------------------------------------


def test_unknown_top_level_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"roundz": 3})
    message = str(info.value)
    assert "'roundz'" in message
    for allowed in ("rounds", "num_clients", "task", "data_dir", "client", "distill"):
        assert allowed in message


def test_unknown_nested_key_names_dotted_key_and_allowed_keys(tmp_path):
    path = write_toml(tmp_path, "[client]\nlr2 = 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'client.lr2'" in message
    for allowed in ("client.lr", "client.batch_size", "client.local_epochs", "client.aggregation"):
        assert allowed in message
    # Only the keys of that table are offered, not the top-level ones.
    assert "num_clients" not in message


def test_unknown_key_two_tables_deep():
    with pytest.raises(ConfigError, match=r"'slm\.tiny\.hidden'.*slm\.tiny\.hidden_size"):
        config_from_dict({"slm": {"tiny": {"hidden": 8}}})


def test_value_where_a_table_is_expected():
    with pytest.raises(ConfigError, match=r"^client: expected a table"):
        config_from_dict({"client": 3})


# --- types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key", "expected"),
    [
        ({"rounds": "3"}, "rounds", "an integer"),
        ({"rounds": True}, "rounds", "an integer"),
        ({"rounds": 2.0}, "rounds", "an integer"),
        ({"client": {"batch_size": False}}, "client.batch_size", "an integer"),
        ({"client": {"lr": "1e-4"}}, "client.lr", "a number"),
        ({"client": {"lr": True}}, "client.lr", "a number"),
        ({"distill": {"enabled": 1}}, "distill.enabled", "true or false"),
        ({"task": 3}, "task", "a string"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules", "a list of str"),
        ({"lora": {"target_modules": ["q_proj", 1]}}, "lora.target_modules", "a list of str"),
    ],
)
def test_wrong_type_is_rejected(values, key, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    message = str(info.value)
    assert message.startswith(f"{key}: expected {expected}")


def test_int_is_accepted_for_a_float():
    config = config_from_dict({"client": {"lr": 1}, "federation": {"round_timeout": 60}})
    assert config.client.lr == 1.0
    assert type(config.client.lr) is float
    assert type(config.federation.round_timeout) is float


def test_list_of_strings_is_accepted():
    config = config_from_dict({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    assert config.lora.target_modules == ["q_proj", "v_proj"]


# --- literals -----------------------------------------------------------------------------


def test_literal_outside_its_set_names_allowed_values(tmp_path):
    path = write_toml(tmp_path, '[distill]\nkd_direction = "sideways"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("distill.kd_direction:")
    assert "'sideways'" in message
    for allowed in ("'forward'", "'reverse'", "'symmetric'"):
        assert allowed in message


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"data": {"partition": "random"}}, "data.partition"),
        ({"client": {"aggregation": "median"}}, "client.aggregation"),
        ({"llm": {"dtype": "float64"}}, "llm.dtype"),
        ({"eval": {"split": "train"}}, "eval.split"),
        ({"distill": {"kd_direction": True}}, "distill.kd_direction"),
    ],
)
def test_other_literals_are_checked(values, key):
    with pytest.raises(ConfigError, match=rf"^{key}: .* is not allowed; choose one of"):
        config_from_dict(values)


def test_literal_inside_its_set_is_accepted():
    config = config_from_dict({"distill": {"kd_direction": "symmetric", "schedule": "sequential"}})
    assert config.distill.kd_direction == "symmetric"
    assert config.distill.schedule == "sequential"


# --- meaning ------------------------------------------------------------------------------


def test_unknown_task_names_the_known_tasks():
    with pytest.raises(ConfigError) as info:
        checked({"task": "piqa"})
    message = str(info.value)
    assert message.startswith("task:")
    assert "'piqa'" in message
    for task in TASKS:
        assert task in message


@pytest.mark.parametrize("task", sorted(set(TASKS) - {"self_instruct"}))
def test_every_known_task_is_accepted(task):
    assert checked({"task": task}).task == task


def test_an_evaluation_only_task_cannot_be_trained():
    with pytest.raises(ConfigError, match=r"^task: .*self_instruct has no train split"):
        checked({"task": "self_instruct", "eval": {"split": "test"}})


def test_data_dir_without_task_train_file_is_rejected(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "validation.jsonl").write_text("")
    with pytest.raises(ConfigError) as info:
        checked({"data_dir": str(tmp_path), "task": "arc_easy"})
    message = str(info.value)
    assert message.startswith("data_dir:")
    assert str(tmp_path / "arc_easy" / "train.jsonl") in message


def test_data_dir_of_another_task_is_rejected(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "train.jsonl").write_text("")
    (tmp_path / "arc_easy" / "validation.jsonl").write_text("")
    assert checked({"data_dir": str(tmp_path)}).data_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="openbookqa/train.jsonl"):
        checked({"data_dir": str(tmp_path), "task": "openbookqa"})


def test_a_missing_evaluation_split_is_named_before_anything_starts(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "train.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^eval\.split: .*arc_easy has no test split"):
        checked({"data_dir": str(tmp_path), "eval": {"split": "test"}})
    (tmp_path / "medmcqa").mkdir()
    (tmp_path / "medmcqa" / "train.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^eval\.split: .*medmcqa/validation\.jsonl does not"):
        checked({"data_dir": str(tmp_path), "task": "medmcqa"})


def test_real_data_dir_is_accepted(data_dir):
    config = checked({"data_dir": str(data_dir), "task": "commonsense_qa"})
    assert config.data_dir == str(data_dir)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": -1}, "rounds"),
        ({"num_clients": 0}, "num_clients"),
        ({"client": {"lr": -1e-4}}, "client.lr"),
        ({"client": {"lr": 0}}, "client.lr"),
        ({"distill": {"kd_temperature": 0.0}}, "distill.kd_temperature"),
        ({"data": {"max_length": 0}}, "data.max_length"),
    ],
)
def test_zero_or_negative_is_rejected_where_positive_is_needed(values, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be greater than 0"):
        config_from_dict(values)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"data": {"train_limit": -1}}, "data.train_limit"),
        ({"client": {"max_steps": -5}}, "client.max_steps"),
        ({"distill": {"kd_weight": -0.5}}, "distill.kd_weight"),
    ],
)
def test_negative_is_rejected_where_zero_is_allowed(values, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be 0 or more"):
        config_from_dict(values)
    zero = {table: dict.fromkeys(inner, 0) for table, inner in values.items()}
    config_from_dict(zero)  # 0 itself is fine


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"optim": {"beta1": 1.0}}, "optim.beta1"),
        ({"optim": {"beta2": -0.1}}, "optim.beta2"),
    ],
)
def test_fractions_must_be_below_one(values, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be in \[0, 1\)"):
        config_from_dict(values)


def test_partitions_by_a_field_need_the_field():
    for data in ({"partition": "by_field"}, {"partition": "dirichlet", "dirichlet_by": "field"}):
        with pytest.raises(ConfigError, match=r"^data\.partition_field: empty"):
            checked({"data": data})
        named = checked({"data": {**data, "partition_field": "subject_name"}})
        assert named.data.partition_field == "subject_name"


# --- model names --------------------------------------------------------------------------


def test_model_path_without_config_json_is_rejected(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    with pytest.raises(ConfigError) as info:
        checked({"slm": {"name": str(model_dir)}})
    message = str(info.value)
    assert message.startswith("slm.name:")
    assert str(model_dir) in message
    assert "config.json" in message


def test_missing_relative_model_path_is_rejected():
    with pytest.raises(ConfigError, match=r"^llm\.name: .*no config\.json"):
        checked({"llm": {"name": "./no/such/model"}})


def test_model_directory_with_config_json_and_hub_ids_are_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = checked({"llm": {"name": str(tmp_path)}, "slm": {"name": "org/some-model"}})
    assert config.llm.name == str(tmp_path)
    assert config.slm.name == "org/some-model"


# --- files and --set overrides ------------------------------------------------------------


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_names_the_file(tmp_path):
    path = write_toml(tmp_path, "rounds = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_overrides_replace_file_values(tmp_path):
    path = write_toml(
        tmp_path,
        'rounds = 2\ntask = "arc_easy"\n[client]\nlr = 3e-3\n'
        "[llm]\ntiny = { hidden_size = 96, num_layers = 3 }\n",
    )
    config = load_config(
        path,
        overrides=[
            "rounds=7",
            "client.lr=1e-4",
            "task=arc_challenge",  # a string without quotes
            'distill.kd_direction="reverse"',  # a quoted TOML string
            "slm.tiny={ hidden_size = 24, num_heads = 2 }",  # a nested table value
            "llm.tiny.num_layers=1",  # one key of an existing nested table
            'lora.target_modules=["q_proj", "v_proj"]',
            "distill.enabled=false",
        ],
    )
    assert config.rounds == 7
    assert config.client.lr == pytest.approx(1e-4)
    assert config.task == "arc_challenge"
    assert config.distill.kd_direction == "reverse"
    assert (config.slm.tiny.hidden_size, config.slm.tiny.num_heads) == (24, 2)
    assert config.llm.tiny.num_layers == 1
    assert config.llm.tiny.hidden_size == 96  # sibling from the file kept
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.distill.enabled is False


def test_override_creates_missing_table(tmp_path):
    path = write_toml(tmp_path, "rounds = 1\n")
    config = load_config(path, overrides=["eval.limit=10", "data.partition=dirichlet"])
    assert config.eval.limit == 10
    assert config.data.partition == "dirichlet"


def test_override_path_string_and_data_dir_argument(tmp_path):
    (tmp_path / "d" / "openbookqa").mkdir(parents=True)
    (tmp_path / "d" / "openbookqa" / "train.jsonl").write_text("")
    path = write_toml(tmp_path, 'task = "openbookqa"\n')
    config = load_config(path, overrides=[f"data_dir={tmp_path / 'd'}"])
    assert config.data_dir == str(tmp_path / "d")
    # data_dir= (the --data-dir flag) wins over the file and --set.
    config = load_config(path, overrides=["data_dir=/nowhere"], data_dir=str(tmp_path / "d"))
    assert config.data_dir == str(tmp_path / "d")


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write_toml(tmp_path, "rounds = 1\n")
    with pytest.raises(ConfigError, match=r"^rounds: expected an integer"):
        load_config(path, overrides=["rounds=many"])
    with pytest.raises(ConfigError, match=r"'client\.lr2'"):
        load_config(path, overrides=["client.lr2=1"])
    with pytest.raises(ConfigError, match=r"^distill\.kd_direction: 'sideways' is not allowed"):
        load_config(path, overrides=["distill.kd_direction=sideways"])


def test_malformed_overrides(tmp_path):
    path = write_toml(tmp_path, "rounds = 1\n")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, overrides=["rounds"])
    with pytest.raises(ConfigError, match="'rounds' is a value, not a table"):
        load_config(path, overrides=["rounds.x=1"])


# --- the command line ---------------------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (a few seconds)
def test_cli_run_with_bad_config_prints_one_error_line(tmp_path):
    path = write_toml(tmp_path, "rounds = 2\n[client]\nlr2 = 0.1\n")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "fedcollm.cli", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "client.lr2" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("rounds = = 2\n", "not valid TOML"),
        ('[distill]\nkd_direction = "sideways"\n', "distill.kd_direction"),
        ("rounds = 0\n", "rounds: must be greater than 0"),
        ("num_clients = 4\n[federation]\nmin_clients = 5\n", "min_clients: 5 is more than"),
        (
            'num_clients = 8\ntask = "vell_fruits"\n[data]\ntrain_limit = 5\n',
            "5 training rows cannot feed 8 clients",
        ),
    ],
)
def test_cli_main_returns_2_with_one_error_line(tmp_path, capsys, text, fragment):
    from fedcollm.cli import main

    path = write_toml(tmp_path, text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert fragment in lines[0]


def test_cli_main_rejects_bad_set_value(tmp_path, capsys):
    from fedcollm.cli import main

    path = write_toml(tmp_path, "rounds = 1\n")
    assert main(["run", str(path), "--set", "client.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: client.lr: must be greater than 0")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")))
def test_every_shipped_config_is_valid(path, data_dir):
    config = check_run(load_config(path, data_dir=str(data_dir)))
    assert config.rounds > 0 and config.num_clients > 0


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU"])
def test_a_device_that_is_not_one_names_the_choices(device):
    with pytest.raises(ConfigError, match=r'^slm.device: .* use "auto", "cpu", "cuda" or'):
        config_from_dict({"slm": {"device": device}})
    assert config_from_dict({"slm": {"device": "cuda:1"}}).slm.device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_a_gpu_where_there_is_none_says_what_to_set():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match=r"no CUDA GPU here .* \"auto\" or \"cpu\""):
        load_model(ModelConfig(device="cuda"), seed=0)
