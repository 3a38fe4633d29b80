"""The `fedcollm` command: `run` a co-tuning job and `plan` its memory, run an `experiment`
and its `report`, `audit` what a run leaks, `evaluate` a model, list `models` and `tasks`,
write test `certs` for a deployment.

Each command lives in a module of this package, and none imports more than the config at its
top: `fedcollm --help` and a refused command answer before torch and transformers load."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from fedcollm.cli.audit import cmd_audit
from fedcollm.cli.common import USER_ERRORS
from fedcollm.cli.experiment import cmd_experiment, cmd_report
from fedcollm.cli.run import cmd_plan, cmd_run
from fedcollm.cli.tools import cmd_certs, cmd_evaluate, cmd_models, cmd_tasks
from fedcollm.console import plain_when_logged


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcollm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one federated co-tuning run in Flower's simulation engine")
    run.add_argument("config", help="TOML experiment file (see configs/)")
    run.add_argument("--out", help="output directory (default runs/<config name>)")
    run.add_argument("--data-dir", help="directory holding <task>/<split>.jsonl")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set client.lr=1e-4 (repeatable)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last round"
    )
    run.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="resume the run in --out if there is one, else start it; a finished run "
        "shows its results",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("evaluate", help="a task's metrics of one model (and adapter)")
    ev.add_argument(
        "--model",
        help='"tiny", a registry name (fedcollm models), a model directory or a hub id',
    )
    ev.add_argument(
        "--config",
        help="instead of --model: the run's TOML file, whose model (--role) is evaluated",
    )
    ev.add_argument("--role", choices=["slm", "llm"], default="slm", help="with --config")
    ev.add_argument("--adapter", help="a saved PEFT adapter directory to apply")
    ev.add_argument(
        "--task", help="a built-in task (fedcollm tasks) or a task file; with --config: its task"
    )
    ev.add_argument("--data-dir", help="where the task's relative data files are")
    ev.add_argument(
        "--split",
        default="",
        choices=["", "train", "validation", "test"],
        help="the task's split to score (default: validation, else test)",
    )
    ev.add_argument("--limit", type=int, default=0, help="N questions only (see --sample)")
    ev.add_argument(
        "--sample",
        default="first",
        choices=["first", "random"],
        help="with --limit: the first N (lm-eval's --limit) or a fixed random draw of N",
    )
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument(
        "--max-length", type=int, default=0, help="tokens per (prompt, choice); 0: the model's"
    )
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--seed", type=int, default=0, help="seed of a tiny model's weights")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)

    exp = sub.add_parser("experiment", help="the paper's comparison: every method, every seed")
    exp.add_argument("config", help="TOML experiment file (models, split, budget)")
    exp.add_argument(
        "--methods",
        default="",
        help="comma-separated (default: zero-shot,standalone,fedavg,centralized,fedcollm)",
    )
    exp.add_argument("--seeds", type=int, default=3, help="seeds seed, seed+1, ...")
    exp.add_argument("--tasks", help="comma-separated tasks (default: the config's task)")
    exp.add_argument("--data-dir", help="directory holding <task>/<split>.jsonl")
    exp.add_argument("--out", help="experiment directory; a re-run resumes there")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    exp.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="run the experiment at each value (several --sweep: their Cartesian grid)",
    )
    exp.set_defaults(func=cmd_experiment)

    audit = sub.add_parser("audit", help="leakage audit: canary exposure, membership inference")
    audit.add_argument("config", help="the run's TOML file (with --compare: an audit directory)")
    audit.add_argument(
        "--compare", nargs="+", metavar="DIR", help="more audit directories to set beside it"
    )
    audit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    audit.add_argument("--data-dir")
    audit.add_argument("--out", help="where audit.json and audit.md go")
    audit.add_argument("--canaries", type=int, default=5, help="secrets in client 0's data")
    audit.add_argument("--repeats", type=int, default=10, help="copies of each secret")
    audit.add_argument("--candidates", type=int, default=200, help="secrets ranked against")
    audit.add_argument(
        "--attack",
        choices=["canary", "reconstruction"],
        default="canary",
        help="canary: exposure and membership (default); reconstruction: text from uploads",
    )
    audit.add_argument("--batches", default="1,4,16", help="reconstruction: batch sizes")
    audit.add_argument("--draws", type=int, default=2, help="reconstruction: batches per size")
    audit.add_argument(
        "--steps", type=int, default=1, help="reconstruction: AdamW steps each client takes"
    )
    audit.set_defaults(func=cmd_audit)
    plan = sub.add_parser("plan", help="predicted peak memory of the server and a client")
    plan.add_argument("config", help="the run's TOML file")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument(
        "--device-memory", metavar="SIZE", help="e.g. 80GiB: how many clients fit on one device"
    )
    plan.set_defaults(func=cmd_plan)
    rep = sub.add_parser("report", help="rebuild an experiment's report, or compare two")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="one directory, or two to compare")
    rep.add_argument("--metric", default="acc", help="acc, acc_norm, rougeL, target_loss...")
    rep.set_defaults(func=cmd_report)

    models = sub.add_parser("models", help="the registry of pretrained models usable offline")
    models.add_argument("--fetch", nargs="+", metavar="NAME", help="fetch and convert these now")
    models.set_defaults(func=cmd_models)

    tasks = sub.add_parser("tasks", help="the built-in tasks: kind, splits and metrics")
    tasks.add_argument("files", nargs="*", metavar="FILE", help="task files to check and show")
    tasks.set_defaults(func=cmd_tasks)

    certs = sub.add_parser("certs", help="test TLS and SuperNode credentials (docs/DEPLOYMENT.md)")
    certs.add_argument("dir", help="where to write them")
    certs.add_argument("--supernodes", type=int, default=3, help="key pairs to make")
    certs.set_defaults(func=cmd_certs)
    return p


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plain_when_logged()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # a clean exit, not the default kill
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from fedcollm.federation.processes import RunInterrupted

        if not isinstance(err, RunInterrupted):
            raise
        print(f"\n{err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Flower's ServerApp thread may still wait for replies that will never come.
        os._exit(err.exit_code)
