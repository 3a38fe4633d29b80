"""`fedcollm audit`: the canary and membership audit, the reconstruction attack, and
audits set side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedcollm.cli.common import check_run, prepare_models
from fedcollm.config import ConfigError, load_config


def cmd_audit(args: argparse.Namespace) -> int:
    """The leakage audit (experiments/audit.py): a run with canaries in client 0's data, then
    what each artefact gives away; audit.json and audit.md in --out. With --compare, the
    audits in the given directories side by side (comparison.md, comparison.png)."""
    if args.compare:
        return _compare_audits(args)
    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    if args.attack == "reconstruction":
        return _reconstruction_audit(config, args)
    from fedcollm.experiments.audit import (
        NAMES,
        SECRETS,
        AuditSettings,
        audit_table,
        run_audit,
    )
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking.run_dir import check_writable

    if min(args.canaries, args.repeats, args.candidates) < 1:
        raise ConfigError("--canaries, --repeats and --candidates: each must be 1 or more")
    if args.canaries > len(NAMES):
        raise ConfigError(f"--canaries: between 1 and {len(NAMES)}, got {args.canaries}")
    if args.candidates > SECRETS - args.canaries:
        raise ConfigError(
            f"--candidates: at most {SECRETS - args.canaries:,} (the six-digit secrets not "
            f"inserted), got {args.candidates:,}"
        )
    check_data(config)
    out = Path(args.out or f"runs/audit-{Path(args.config).stem}")
    check_writable(out)
    prepare_models(config)
    check_models(config)
    settings = AuditSettings(args.canaries, args.repeats, args.candidates)
    results = run_audit(config, settings, progress=lambda m: print(m, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps({"config": config.to_dict(), **results}, indent=2))
    table = audit_table(results)
    (out / "audit.md").write_text(table + "\n")
    print(f"\n{table}\n\naudit: {out / 'audit.json'}")
    return 0


def _reconstruction_audit(config, args: argparse.Namespace) -> int:
    """What the server reads of client batches from one AdamW step's uploads
    (experiments/reconstruction_audit.py): reconstruction.json, .md and .png in --out."""
    from fedcollm.experiments.reconstruction_audit import (
        AttackSettings,
        plot_reconstruction,
        reconstruction_table,
        run_reconstruction,
    )
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking.run_dir import check_writable

    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ConfigError(
            f"--batches: comma-separated sizes such as 1,4,16, got {args.batches!r}"
        ) from None
    if min(*batches, args.draws, args.steps) < 1:
        raise ConfigError("--batches, --draws and --steps: each must be 1 or more")
    check_data(config)
    out = Path(args.out or f"runs/audit-{Path(args.config).stem}")
    check_writable(out)
    prepare_models(config)
    check_models(config)
    settings = AttackSettings(batches, args.draws, args.steps)
    results = run_reconstruction(config, settings, progress=lambda m: print(m, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruction.json").write_text(json.dumps(results, indent=2))
    table = reconstruction_table(results)
    (out / "reconstruction.md").write_text(table + "\n")
    plot_reconstruction(results, out / "reconstruction.png")
    print(f"\n{table}\n\nreconstruction: {out / 'reconstruction.md'}, {out / 'reconstruction.png'}")
    return 0


def _compare_audits(args: argparse.Namespace) -> int:
    from fedcollm.experiments.audit import comparison_table, plot_comparison
    from fedcollm.tracking.run_dir import check_writable

    audits = []
    for directory in [args.config, *args.compare]:
        path = Path(directory) / "audit.json"
        if not path.is_file():
            raise ConfigError(f"--compare: {directory} holds no audit.json; run fedcollm audit")
        try:
            audit = json.loads(path.read_text())
            if not isinstance(audit, dict) or "artefacts" not in audit:
                raise ValueError
        except (OSError, ValueError):
            raise ConfigError(
                f"--compare: {path} is damaged (not an audit's results); run fedcollm audit "
                "again into that directory"
            ) from None
        audits.append(audit)
    out = Path(args.out or "runs/audit-comparison")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(audits)
    (out / "comparison.md").write_text(table + "\n")
    plot_comparison(audits, out / "comparison.png")
    print(f"{table}\n\n{out / 'comparison.md'}\n{out / 'comparison.png'}")
    return 0
