"""The `fedcollm evaluate` command on a tiny model (once as its own process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedcollm import cli


def fedcollm(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedcollm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_prints_one_json_object(data_dir):
    result = fedcollm(
        "evaluate",
        "--model",
        "tiny",
        "--task",
        "openbookqa",
        "--data-dir",
        str(data_dir),
        "--limit",
        "5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["n"] == 5 and summary["task"] == "openbookqa"
    assert 0 <= summary["acc"] <= 1 and 0 <= summary["acc_norm"] <= 1


def test_evaluate_rejects_an_unknown_task_and_a_missing_adapter(data_dir, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", "tiny", "--task", "piqa"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --task: unknown task 'piqa'; choose one of arc_challenge, arc_easy, "
        "arc_easy_demo, code_alpaca, commonsense_qa, flores_fra_eng, medmcqa, mmlu, "
        "mmlu_humanities, mmlu_social_sciences, mmlu_stem, openbookqa, scitldr, self_instruct, "
        "tfns, vell_fruits, or give the path of a task file (.yaml)"
    ]
    args = ["--task", "arc_easy", "--data-dir", str(data_dir), "--adapter", str(tmp_path)]
    assert cli.main(["evaluate", "--model", "tiny", *args, "--limit", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "adapter_config.json" in line


def test_evaluate_scores_summaries_by_rouge_and_translations_by_chrf_and_bleu(data_dir, capsys):
    import sacrebleu

    expected = {"scitldr": ("rouge1", "rouge2", "rougeL"), "flores_fra_eng": ("chrf", "bleu")}
    for task, metrics in expected.items():
        args = ["evaluate", "--model", "tiny", "--task", task, "--data-dir", str(data_dir)]
        assert cli.main([*args, "--limit", "3", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["n"] == 3 and {*metrics, "target_loss"} <= summary.keys()
    # A tiny random model's words are nowhere in the reference: chrF++ near 0, not a share.
    assert 0 <= summary["chrf"] < 100 and summary["chrf_stderr"] >= 0
    assert sacrebleu.__version__.startswith("2.6")


def test_the_command_line_answers_help_before_torch_loads():
    """`fedcollm --help` and refused commands must not wait for torch and transformers (40 s
    on a loaded machine); checked by what is imported, not by a clock."""
    probe = (
        "import sys; from fedcollm import cli; cli.parser().parse_args(['run', 'x.toml']); "
        "print(sorted(m for m in ('torch', 'transformers', 'flwr') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert cli.main(["run", "no-such-config.toml"]) == 2  # refused without them too


@pytest.mark.parametrize("command", [["tasks"], ["models"]])
def test_listing_tasks_and_models_loads_no_torch(command):
    """`fedcollm tasks` and `models` read files and a table: they answered after 5-48 s of
    torch and transformers loading through the packages' imports."""
    probe = (
        f"import sys; from fedcollm import cli; assert cli.main({command!r}) == 0; "
        "print(sorted(m for m in ('torch', 'transformers', 'flwr') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "arc_easy_demo" in result.stdout or "qwen2.5-coder" in result.stdout


def test_a_command_whose_output_goes_to_a_file_draws_no_progress_bars():
    """`fedcollm evaluate ... 2> log` wrote transformers' weight-loading bar into the log."""
    probe = (
        "from fedcollm import cli; cli.main(['tasks']); "
        "from transformers.utils import logging; "
        "import os; print(logging.is_progress_bar_enabled(), os.environ['RAY_COLOR_PREFIX'])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False 0"
