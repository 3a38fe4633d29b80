"""`fedcollm run` (one co-tuning run in Flower's simulation) and `fedcollm plan` (its
predicted memory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcollm.cli.common import USER_ERRORS, check_run, prepare_models
from fedcollm.config import load_config


def cmd_run(args: argparse.Namespace) -> int:
    """Every check first (config, data, output directory, checkpoint, models), then the
    simulation: a run that is refused has written nothing and started nothing."""
    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    from fedcollm.federation.simulation import simulate  # heavy: only for a valid config
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking import checkpoint as ckpt
    from fedcollm.tracking.run_dir import prepare_run

    split = check_data(config)
    if split.duplicates:
        print(
            f"data: {split.duplicates} training rows repeat an earlier row (the same "
            "question, choices and answer) and are left out",
            file=sys.stderr,
        )
    out_dir = Path(args.out or f"runs/{Path(args.config).stem}")
    resume = args.resume
    if args.continue_run:
        resume = ckpt.latest_round(out_dir / "checkpoint") is not None
    start = prepare_run(config, out_dir, resume, split)
    if args.continue_run and resume and _finished(out_dir, start.checkpoint, config):
        return 0
    try:
        prepare_models(config)
        check_models(config)
        _check_gpu_memory(config)
    except USER_ERRORS:
        start.abandon()
        raise
    print(
        f"fedcollm run: {config.num_clients} clients, {config.rounds} rounds, "
        f"task {config.task}, output in {out_dir}",
        flush=True,
    )
    simulate(config, out_dir, verbose=args.verbose, resume=resume, start=start)
    return 0


def _finished(out_dir: Path, checkpoint, config) -> bool:
    """A run that has done all its rounds: say where its results are instead of rerunning."""
    from fedcollm.tracking.metrics import read_metrics, summary_table

    metrics = out_dir / "metrics.jsonl"
    if checkpoint.server_round < config.rounds or not (out_dir / "adapters").is_dir():
        return False
    print(summary_table(read_metrics(metrics) if metrics.is_file() else checkpoint.rows))
    print(f"\n{out_dir} holds this finished run (all {config.rounds} rounds)")
    print(f"report: {out_dir / 'report.md'}\nmetrics: {metrics}\nadapters: {out_dir / 'adapters'}")
    print(f"to run it again from the start: rm -r {out_dir}, or choose another --out")
    return True


def _check_gpu_memory(config) -> None:
    """Clients sharing a GPU (federation.client_gpus) must fit on it, by the memory plan."""
    import torch

    if config.federation.client_gpus > 0 and torch.cuda.is_available():
        from fedcollm.plan import check_clients_fit

        check_clients_fit(config, torch.cuda.get_device_properties(0).total_memory)


def cmd_plan(args: argparse.Namespace) -> int:
    """The predicted peak memory of the server and of one client (plan.py), from the
    models' configs only; with --device-memory, how many simulated clients fit on one."""
    config = check_run(load_config(args.config, overrides=args.set), simulated=False)
    from fedcollm.plan import memory_plan, parse_size, plan_table
    from fedcollm.preflight import check_models

    device = parse_size(args.device_memory) if args.device_memory else None
    prepare_models(config)
    check_models(config)
    print(plan_table(config, memory_plan(config), device))
    return 0
