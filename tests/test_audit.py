"""The leakage audit: its exposure is the Secret Sharer's, and a run with canaries shows them
in the client's upload."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fedcollm.experiments import audit

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def test_exposure_is_log2_candidates_minus_log2_rank(monkeypatch):
    canaries = audit.make_canaries(2, random.Random(0))
    # The first canary's secret is the likeliest of 8 (rank 1), the second the least (rank 8).
    losses = iter([[0.1] + [1.0] * 7, [2.0] + [1.0] * 7])
    monkeypatch.setattr(audit, "target_losses", lambda *a, **k: next(losses))
    exposure = audit.exposures(None, None, canaries, 7, random.Random(1))
    assert exposure == pytest.approx([3.0, 0.0])
    assert all(c.answer.isdigit() and len(c.answer) == 6 for c in canaries)


def test_membership_auc_counts_lower_member_losses_and_half_the_ties(monkeypatch):
    losses = iter([[0.1, 0.5], [0.5, 0.9]])
    monkeypatch.setattr(audit, "target_losses", lambda *a, **k: next(losses))
    # Pairs (0.1, 0.5) win, (0.1, 0.9) win, (0.5, 0.5) tie, (0.5, 0.9) win: 3.5 of 4.
    assert audit.membership_auc(None, None, [None] * 2, [None] * 2) == 0.875


@pytest.mark.slow
def test_an_audit_sees_the_canaries_in_the_clients_upload(tmp_path, data_dir):
    out = tmp_path / "audit"
    command = [sys.executable, "-m", "fedcollm.cli", "audit", str(TINY), "--out", str(out)]
    command += ["--data-dir", str(data_dir), "--candidates", "50", "--repeats", "20"]
    for setting in ("rounds=1", "client.max_steps=0", "client.lr=1e-2", "eval.limit=8"):
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "audit.json").read_text())
    artefacts = results["artefacts"]
    assert list(artefacts) == [
        "base SLM",
        "client 0's upload",
        "global theta",
        "LLM with omega",
    ]
    assert results["max_exposure"] == pytest.approx(math.log2(51))
    for a in artefacts.values():
        assert all(0 <= e <= results["max_exposure"] for e in a["exposure_per_canary"])
        assert 0 <= a["membership_auc"] <= 1
    # Twenty copies of each secret at a high learning rate: the upload ranks them far
    # above the untrained SLM, which ranks them at about chance.
    assert artefacts["client 0's upload"]["exposure"] > artefacts["base SLM"]["exposure"] + 1
    assert "| client 0's upload |" in (out / "audit.md").read_text()


def _fake_audit(directory: Path, noise: float, epsilon: float | None) -> None:
    artefact = {"exposure": 2.0, "membership_auc": 0.6, "acc": 0.5, "acc_stderr": 0.05}
    results = {
        "privacy": {"clip_norm": 1.0 if noise else 0.0, "noise_multiplier": noise},
        "epsilon": epsilon,
        "chance_exposure": 1.44,
        "max_exposure": 5.67,
        "artefacts": {"base SLM": artefact, "global theta": {**artefact, "exposure": 4.0}},
    }
    directory.mkdir()
    (directory / "audit.json").write_text(json.dumps(results))


def test_audits_are_compared_side_by_side(tmp_path, capsys):
    from fedcollm import cli

    _fake_audit(tmp_path / "plain", 0.0, None)
    _fake_audit(tmp_path / "dp", 2.0, 7.08)
    out = tmp_path / "cmp"
    args = ["audit", str(tmp_path / "plain"), "--compare", str(tmp_path / "dp"), "--out", str(out)]
    assert cli.main(args) == 0
    table = (out / "comparison.md").read_text()
    assert "| no DP | global theta | 4.00 |" in table
    assert "| clip 1, sigma 2 (epsilon 7.08) | base SLM | 2.00 | 0.600 |" in table
    assert (out / "comparison.png").stat().st_size > 10_000
    capsys.readouterr()
    assert cli.main(["audit", str(tmp_path / "plain"), "--compare", str(tmp_path)]) == 2
    assert "holds no audit.json" in capsys.readouterr().err
    for damaged in ('{"config": ', "{}"):
        (tmp_path / "dp" / "audit.json").write_text(damaged)
        assert cli.main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "audit.json is damaged" in line
    blocked = tmp_path / "a file"
    blocked.write_text("")
    (tmp_path / "dp" / "audit.json").write_text((tmp_path / "plain" / "audit.json").read_text())
    assert cli.main([*args[:-1], str(blocked / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "a file" in line


def test_more_candidates_than_six_digit_secrets_and_no_methods_are_refused(capsys):
    from fedcollm import cli

    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.toml")
    assert cli.main(["audit", tiny, "--candidates", "10000000"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--candidates: at most 899,995 (the six-digit secrets not inserted)" in line
    assert cli.main(["experiment", tiny, "--methods", ","]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--methods ',': name at least one method" in line


def test_the_reconstruction_audit_reads_a_clients_upload_but_not_its_dp_sum(tmp_path, data_dir):
    # A tiny SLM wide enough for the attack (hidden 128, r 16, no dropout): one client's
    # upload names most of its row's tokens; the DP sum of three (C 0.5, sigma 1) almost none.
    from fedcollm import cli

    wide = "slm.tiny={hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256}"
    sets = [wide, "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "client.lr=3e-4"]
    out = tmp_path / "rec"
    args = ["audit", str(TINY), "--attack", "reconstruction", "--data-dir", str(data_dir)]
    args += ["--out", str(out), "--batches", "1", "--draws", "1"]
    assert cli.main(args + [a for s in sets for a in ("--set", s)]) == 0
    results = json.loads((out / "reconstruction.json").read_text())
    precision = {row["view"]: row["token_precision"] for row in results["summary"]}
    assert precision["upload"] > 0.5 and precision["secagg+dp"] < 0.25, precision
    assert (out / "reconstruction.png").stat().st_size > 0
    assert "| upload | 1 |" in (out / "reconstruction.md").read_text()


def test_reconstruction_batches_that_are_not_sizes_are_refused(capsys):
    from fedcollm import cli

    assert cli.main(["audit", str(TINY), "--attack", "reconstruction", "--batches", "4,x"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--batches: comma-separated sizes" in line
