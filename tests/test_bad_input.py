"""Bad input, tried as a new user would: each ends in one line naming the problem and the
fix, exit code 2, before anything starts and without touching what an earlier run left."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcollm import cli
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import Config, ConfigError, load_config
from fedcollm.federation import simulation
from fedcollm.models import build_slm, save_adapter
from fedcollm.tracking.checkpoint import save_checkpoint
from fedcollm.tracking.run_dir import prepare_run

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
ARC = {
    "id": "Mercury_1",
    "question": "Which is a mammal?",
    "choices": {"text": ["a whale", "a trout", "an ant"], "label": ["A", "B", "C"]},
    "answerKey": "A",
}


@pytest.fixture
def started(monkeypatch) -> list:
    """Records every call of the simulation, which none of the refused runs may reach."""
    calls: list = []
    monkeypatch.setattr(simulation, "simulate", lambda *a, **k: calls.append((a, k)) or [])
    return calls


def refused(capsys, *args: str) -> str:
    """The one error line of a command that must exit with 2."""
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run_args(data_dir, out, *sets: str) -> list[str]:
    return [
        "run",
        str(TINY),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
    ]


# --- config values ------------------------------------------------------------------------

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("client.lr=nan", "client.lr: must be a finite number"),
        ("client.lr=inf", "client.lr: must be a finite number"),
        ("federation.max_update_norm=nan", "federation.max_update_norm: must be a finite"),
        ("seed=-1", "seed: must be in [0, 4294967295]"),
        ("seed=20000000000000", "seed: must be in [0, 4294967295]"),
        ("data.max_length=1", "data.max_length: must be at least 2"),
        ("distill.top_k=100000", "distill.top_k: 100000 is more than the 257 tokens"),
        ("federation.client_cpus=4096", "federation.client_cpus: 4096 is more than the"),
        ('lora.target_modules=["nope"]', "lora.target_modules: nope not in llm.name 'tiny'"),
        ('eval.split="test"', "eval.split: " + "{arc}: task arc_easy has no test split"),
        ("privacy.noise_multiplier=1.0", "privacy.noise_multiplier is set but privacy.clip_norm"),
        ("federation.clients_per_round=5", "federation.clients_per_round: 5 is more than"),
        ("privacy.clip_norm=-1.0", "privacy.clip_norm: must be 0 or more"),
        pytest.param("federation.client_gpus=1", "PyTorch sees no CUDA GPU", marks=NO_GPU),
        pytest.param('llm.device="cuda"', "llm.device: device 'cuda'", marks=NO_GPU),
    ],
)
def test_a_bad_value_stops_the_run_before_it_starts(
    capsys, tmp_path, data_dir, started, setting, fragment
):
    line = refused(capsys, *run_args(data_dir, tmp_path / "out", setting))
    arc = Path(cli.__file__).parents[1] / "data" / "task_files" / "arc_easy.yaml"
    assert fragment.format(arc=arc) in line
    assert not started and not (tmp_path / "out").exists()


def test_a_bad_audit_stops_before_any_model_loads(capsys, tmp_path, data_dir):
    args = ["audit", str(TINY), "--data-dir", str(data_dir), "--out", str(tmp_path / "a")]
    assert "--canaries, --repeats and --candidates" in refused(capsys, *args, "--canaries", "0")
    assert "--canaries: between 1 and 10" in refused(capsys, *args, "--canaries", "11")
    assert not (tmp_path / "a").exists()


def test_top_k_across_two_tokenizers_stops_the_run_before_it_starts(
    capsys, tmp_path, data_dir, started
):
    sets = ['llm.tiny.tokenizer="pieces"', "distill.top_k=5"]
    line = refused(capsys, *run_args(data_dir, tmp_path / "out", *sets))
    assert "tokenizers differ, so set distill.top_k = 0" in line
    assert not started and not (tmp_path / "out").exists()


def test_a_model_directory_without_weights_is_named(capsys, tmp_path, data_dir, started):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = refused(capsys, *run_args(data_dir, tmp_path / "out", f'slm.name="{model}"'))
    assert "lacks weights" in line and str(model) in line and not started


# --- config files -------------------------------------------------------------------------


def test_config_files_that_cannot_be_read_are_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="is a directory; give the TOML file in it"):
        load_config(tmp_path)
    path = tmp_path / "exp.toml"
    path.write_bytes(b"rounds = 2\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 16\)"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbfrounds = 3\n")  # a byte-order mark, as some editors write
    assert load_config(path).rounds == 3

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)"):
        load_config(path)


# --- data ---------------------------------------------------------------------------------


def _arc_dir(tmp_path: Path, train: list, validation: list) -> Path:
    folder = tmp_path / "data" / "arc_easy"
    folder.mkdir(parents=True)
    for split, rows in (("train", train), ("validation", validation)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


GOOD = [{**ARC, "id": f"Mercury_{i}", "question": f"Question {i}?"} for i in range(12)]


@pytest.mark.parametrize(
    ("train", "validation", "fragment"),
    [
        (
            [
                *GOOD,
                {**ARC, "answerKey": "C", "choices": {"text": ["a", "b"], "label": list("ABC")}},
            ],
            GOOD,
            "train.jsonl:13: doc_to_target 2 is not among the choices ['a', 'b']",
        ),
        (
            GOOD,
            [{**ARC, "choices": {"text": ["a", "", "c"], "label": ["A", "B", "C"]}}],
            "validation.jsonl:1: choice 2 is empty",
        ),
        (GOOD, [], "validation.jsonl holds no rows"),
        (
            [{k: v for k, v in ARC.items() if k != "question"}, *GOOD],
            GOOD,
            "train.jsonl:1: doc_to_text names a missing field ('question' is undefined)",
        ),
    ],
)
def test_bad_data_stops_the_run_before_it_starts(
    capsys, tmp_path, started, train, validation, fragment
):
    data = _arc_dir(tmp_path, train, validation)
    line = refused(capsys, *run_args(data, tmp_path / "out", "data.train_limit=0"))
    assert fragment in line and not started


def test_repeated_rows_are_left_out_and_the_run_says_so(capsys, tmp_path, started):
    data = _arc_dir(tmp_path, [*GOOD, *GOOD[:5]], GOOD)
    assert cli.main(run_args(data, tmp_path / "out", "data.train_limit=0")) == 0
    assert "5 training rows repeat an earlier row" in capsys.readouterr().err
    assert len(started) == 1


# --- the output directory and its checkpoint ----------------------------------------------


def read_only_under(monkeypatch, name: str) -> None:
    """Directories under a path part `name` cannot be made, as on a read-only mount (this
    machine runs as root, which writes anywhere)."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if name in self.parts:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)


def test_an_output_directory_that_cannot_be_written_is_named(
    capsys, tmp_path, data_dir, started, monkeypatch
):
    (tmp_path / "a-file").write_text("")
    line = refused(capsys, *run_args(data_dir, tmp_path / "a-file" / "out"))
    assert "cannot write there" in line
    read_only_under(monkeypatch, "ro")
    line = refused(capsys, *run_args(data_dir, tmp_path / "ro" / "out"))
    assert "cannot write there (Read-only file system)" in line and not started


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["a-file/certs"], "certs DIR {tmp}/a-file/certs: cannot write there (Not a directory)"),
        (["ro/certs"], "certs DIR {tmp}/ro/certs: cannot write there (Read-only file system)"),
        (["certs", "--supernodes", "-1"], "--supernodes -1: give between 0 and 1000 key pairs"),
        (["certs", "--supernodes", "99999"], "--supernodes 99999: give between 0 and 1000"),
    ],
)
def test_test_credentials_that_cannot_be_written_are_refused(
    capsys, tmp_path, monkeypatch, args, fragment
):
    (tmp_path / "a-file").write_text("")
    read_only_under(monkeypatch, "ro")
    line = refused(capsys, "certs", str(tmp_path / args[0]), *args[1:])
    assert fragment.format(tmp=tmp_path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, data_dir):
    """A run directory as an interrupted run leaves it after round 1 of 2."""
    config = load_config(TINY, data_dir=str(data_dir))
    server = CoTuningServer.from_config(config)
    out = tmp_path_factory.mktemp("checkpointed")
    row = {"round": 1, "llm_acc": 0.5}
    save_checkpoint(out / "checkpoint", 1, server, [{"round": 0}, row])
    (out / "config.json").write_text("the earlier run's config\n")
    (out / "metrics.jsonl").write_text("the earlier run's metrics\n")
    return out


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    return copy


@pytest.mark.parametrize(
    ("latest", "round_file", "fragment"),
    [
        ("", None, "is damaged ('' is not a round number)"),
        ("garbage\n", None, "is damaged ('garbage' is not a round number)"),
        ("3\n", None, "names round 3, but"),
        ("1\n", b"PK\x03\x04truncated", "round-1.pt is damaged"),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_damaged_checkpoint_is_named(
    capsys, tmp_path, data_dir, started, checkpointed, latest, round_file, fragment, resume
):
    out = _copy(checkpointed, tmp_path)
    (out / "checkpoint" / "latest").write_text(latest)
    if round_file is not None:
        (out / "checkpoint" / "round-1.pt").write_bytes(round_file)
    if round_file is not None and not resume:
        return  # without --resume the round file is not read: the run is refused as existing
    line = refused(capsys, *run_args(data_dir, out), *(["--resume"] if resume else []))
    assert fragment in line and "to start afresh" in line and not started


def test_a_refused_resume_leaves_the_earlier_run_as_it_was(
    capsys, tmp_path, data_dir, started, checkpointed
):
    out = _copy(checkpointed, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = refused(capsys, *run_args(data_dir, out, "seed=1"), "--resume")
    assert "differs from the checkpointed run in seed" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not started


def test_continue_starts_resumes_or_shows_a_finished_run(
    capsys, tmp_path, data_dir, started, checkpointed
):
    assert cli.main([*run_args(data_dir, tmp_path / "new"), "--continue"]) == 0
    out = _copy(checkpointed, tmp_path)  # round 1 of 2: resumed
    assert cli.main([*run_args(data_dir, out), "--continue"]) == 0
    assert [call[1]["resume"] for call in started] == [False, True]
    (out / "adapters").mkdir()  # round 1 of 1: finished, nothing to run again
    row = {
        "round": 0,
        "task": "arc_easy",
        "eval_split": "validation",
        "eval_questions": 4,
        "llm_acc": 0.25,
        "llm_acc_norm": 0.5,
        "slm_acc": 0.25,
        "slm_acc_norm": 0.5,
        "clients": [],
        "seconds": {"round": 1.0},
    }
    (out / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    capsys.readouterr()
    assert cli.main([*run_args(data_dir, out, "rounds=1"), "--continue"]) == 0
    shown = capsys.readouterr().out
    assert f"{out} holds this finished run" in shown and "report.md" in shown
    assert len(started) == 2


# --- fedcollm evaluate --------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """An adapter of the default tiny SLM (what --model tiny builds), saved by PEFT."""
    slm, _ = build_slm(Config())
    directory = tmp_path_factory.mktemp("adapter") / "slm"
    save_adapter(slm, directory)
    return directory


def _evaluate(data_dir, *args: str) -> list[str]:
    return ["evaluate", "--task", "arc_easy", "--data-dir", str(data_dir), "--limit", "2", *args]


def _damaged(adapter: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "adapter"
    subprocess.run(["cp", "-r", str(adapter), str(copy)], check=True)
    damage(copy)
    return copy


def _truncate(directory: Path) -> None:
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_truncate, "adapter_model.safetensors is damaged"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "is damaged"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "holds no adapter_model"),
    ],
)
def test_a_damaged_adapter_is_named(capsys, tmp_path, data_dir, adapter, damage, fragment):
    broken = _damaged(adapter, tmp_path, damage)
    line = refused(capsys, *_evaluate(data_dir, "--model", "tiny", "--adapter", str(broken)))
    assert fragment in line


def test_an_adapter_of_another_base_model_is_named(capsys, tmp_path, data_dir):
    config = load_config(TINY)  # its SLM is 48 wide; --model tiny is 64 wide
    slm, _ = build_slm(config)
    save_adapter(slm, tmp_path / "narrow")
    line = refused(
        capsys, *_evaluate(data_dir, "--model", "tiny", "--adapter", str(tmp_path / "narrow"))
    )
    assert "does not fit this model" in line and "another base model" in line
    # The config that trained it builds the right model.
    args = _evaluate(data_dir, "--config", str(TINY), "--adapter", str(tmp_path / "narrow"))
    assert cli.main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["model"] == "tiny"
    assert math.isclose(summary["acc_stderr"], math.sqrt(summary["acc"] * (1 - summary["acc"]) / 1))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "tiny", "--batch-size", "0"], "--batch-size: must be 1 or more, got 0"),
        (["--model", "tiny", "--limit", "-1"], "--limit: must be 0 or more, got -1"),
        (["--model", "/nonexistent"], "model directory /nonexistent does not exist"),
        ([], "give --model and --task, or --config"),
    ],
)
def test_bad_evaluate_arguments_are_named(capsys, data_dir, args, fragment):
    assert fragment in refused(capsys, *_evaluate(data_dir, *args))


@pytest.mark.slow  # three processes
def test_identical_adapters_are_identical_files_whatever_the_hash_seed(tmp_path):
    code = (
        "import sys; from fedcollm.config import Config; "
        "from fedcollm.models import build_slm, save_adapter; from pathlib import Path; "
        "save_adapter(build_slm(Config())[0], Path(sys.argv[1]))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env=env, check=True)
    configs = {(tmp_path / s / "adapter_config.json").read_bytes() for s in ("1", "2")}
    assert len(configs) == 1


def test_an_experiment_reads_every_tasks_data_before_its_first_run(capsys, tmp_path, monkeypatch):
    from fedcollm.experiments import runs

    monkeypatch.setattr(runs, "run_experiment", lambda *a, **k: pytest.fail("it started"))
    data = _arc_dir(tmp_path, GOOD, [{**ARC, "answerKey": "Z"}])
    line = refused(
        capsys,
        "experiment",
        str(TINY),
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "exp"),
        "--set",
        "data.train_limit=0",
    )
    assert "validation.jsonl:1: doc_to_target fails on this row (ValueError: 'Z' is not" in line
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    ("sweep", "says"),
    [
        (["lora.r"], "--sweep 'lora.r': expected KEY=V1,V2,..."),
        (["lora.r=4,4"], "--sweep lora.r: a value is repeated"),
        (["lora.r=4", "lora.r=8"], "--sweep lora.r: swept twice"),
        (["lora.r=4,0"], "lora.r: must be greater than 0, got 0"),
        (["lora.rank=4,8"], "unknown key 'lora.rank'"),
    ],
)
def test_a_bad_sweep_is_refused_before_any_point_runs(
    capsys, tmp_path, data_dir, monkeypatch, sweep, says
):
    from fedcollm.experiments import runs

    monkeypatch.setattr(runs, "run_experiment", lambda *a, **k: pytest.fail("it started"))
    args = ["experiment", str(TINY), "--data-dir", str(data_dir), "--out", str(tmp_path / "x")]
    line = refused(capsys, *args, *[a for s in sweep for a in ("--sweep", s)])
    assert says in line
    assert not (tmp_path / "x").exists()


def test_an_unknown_or_missing_tracker_is_refused(capsys, tmp_path, data_dir, monkeypatch):
    import importlib.util

    line = refused(capsys, *run_args(data_dir, tmp_path / "a", 'tracking=["wandb"]'))
    assert "tracking: 'wandb' is not a tracker; choose from tensorboard, mlflow" in line
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    line = refused(capsys, *run_args(data_dir, tmp_path / "b", 'tracking=["mlflow"]'))
    assert "needs the mlflow package; install it with pip install 'fedcollm[tracking]'" in line


@pytest.mark.parametrize(
    ("split", "says"),
    [
        ("train", "the training data differ from the checkpointed run's"),
        ("validation", "the evaluation questions differ from those the checkpointed run"),
    ],
)
def test_data_edited_without_changing_its_row_count_is_noticed_on_resume(
    capsys, tmp_path, data_dir, started, split, says
):
    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    for name in ("train", "validation"):
        (data / "arc_easy" / f"{name}.jsonl").write_bytes(
            (data_dir / "arc_easy" / f"{name}.jsonl").read_bytes()
        )
    config = load_config(TINY, data_dir=str(data))
    out = tmp_path / "run"
    start = prepare_run(config, out, resume=False)
    server = CoTuningServer.from_config(config)
    save_checkpoint(out / "checkpoint", 1, server, [], start.evaluation_fingerprint)
    start.abandon()
    assert cli.main([*run_args(data, out), "--resume"]) == 0  # the same data: resumed
    edited = data / "arc_easy" / f"{split}.jsonl"
    lines = edited.read_text().splitlines()
    lines[7] = lines[7].replace('"question": "', '"question": "Edited: ', 1)
    edited.write_text("\n".join(lines) + "\n")
    assert says in refused(capsys, *run_args(data, out), "--resume")
    assert len(started) == 1


def test_a_second_run_into_a_held_output_directory_is_refused(capsys, tmp_path, data_dir, started):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from fedcollm.tracking.run_dir import hold; "
            f"hold(Path({str(out)!r})); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(capsys, *run_args(data_dir, out))
        assert "another fedcollm process is writing there now" in line and not started
        experiment = ["experiment", str(TINY), "--data-dir", str(data_dir), "--out", str(out)]
        assert "another fedcollm process" in refused(capsys, *experiment)
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(run_args(data_dir, out)) == 0 and len(started) == 1  # free again
