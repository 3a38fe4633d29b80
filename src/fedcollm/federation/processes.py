"""The processes Ray starts for a simulated run: stopped with the run, reaped after a kill.

Ray's daemons and client actors (gigabytes each with real models) are children of the run's
process. When the run is interrupted (Ctrl-C, to the process or its group, or SIGTERM),
`stopped_with_the_run` ends all of them and raises `RunInterrupted`; the checkpoint of the
last complete round stays as it is (it is only ever replaced whole). When the run itself is
killed (`kill -9`) some of them outlive it, orphaned; every run leaves a record (its pid,
process group and start time) in `RECORDS`, so that the next run finds what an earlier,
dead one left in its process group and stops it. Linux only (/proc); elsewhere the
processes are not looked for.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RECORDS = Path(tempfile.gettempdir()) / "fedcollm-runs"


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, start time in clock ticks) of a live process; None for
    one that is gone or a zombie (dead, holding nothing but its exit status)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def _pids() -> list[int]:
    proc = Path("/proc")
    return [int(p.name) for p in proc.iterdir() if p.name.isdigit()] if proc.is_dir() else []


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child in _pids():
        if (stat := _stat(child)) is not None:
            children.setdefault(stat[0], []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_descendants(grace: float = 3.0) -> set[int]:
    """End every process below this one: SIGTERM, then SIGKILL what is left after `grace`
    seconds (twice over, for children started meanwhile). Returns their pids."""
    stopped: set[int] = set()
    for _ in range(2):
        pids = descendants(os.getpid())
        stopped |= pids
        _kill(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_stat(p) for p in pids):
            time.sleep(0.1)
        _kill({p for p in pids if _stat(p)}, signal.SIGKILL)
    return stopped


def _is_ray(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return comm in ("raylet", "gcs_server") or comm.startswith("ray::") or "/ray/" in cmdline


def _left_by(pid: int, run: dict) -> bool:
    """Whether `pid` is a Ray process of `run`: in its process group, started after it."""
    stat = _stat(pid)
    return stat is not None and stat[1] == run["pgid"] and stat[2] >= run["start"] and _is_ray(pid)


def record_run() -> Path | None:
    """Leave a record of this run for `reap_leftovers`; remove it when the run ends."""
    stat = _stat(os.getpid())
    if stat is None:
        return None
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{os.getpid()}.json"
    path.write_text(json.dumps({"pid": os.getpid(), "pgid": stat[1], "start": stat[2]}))
    return path


def reap_leftovers() -> list[int]:
    """Stop the Ray processes of earlier runs that were killed: those in a dead run's process
    group, started after it. Returns their pids."""
    reaped: list[int] = []
    for path in sorted(RECORDS.glob("*.json")) if RECORDS.is_dir() else []:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        owner = _stat(run["pid"])
        if owner is not None and owner[2] == run["start"]:
            continue  # that run is still going
        left = [pid for pid in _pids() if pid != os.getpid() and _left_by(pid, run)]
        _kill(set(left), signal.SIGKILL)
        reaped += left
        path.unlink(missing_ok=True)
    return reaped


class RunInterrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM; Ray's processes are gone, the checkpoint of
    the last complete round is in place. `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, out_dir: Path):
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}: stopped the run and its Ray "
            f"processes; {out_dir} keeps the checkpoint of the last complete round, continue "
            "with --resume"
        )


def _quiet_flower() -> None:
    """The run is stopping: client actors that die now are expected, not errors to show."""
    logging.getLogger("flwr").setLevel(logging.CRITICAL)


# The run inside `stopped_with_the_run` now (0: none; each run its own number), and whether
# it has caught the exception a stop signal raised.
_run = {"current": 0, "started": 0}
_stop_caught = threading.Event()


def _again_unless_caught(signum: int) -> None:
    """A signal handler's exception is lost where Python ignores exceptions: in an at-fork
    callback (logging's, while Ray starts a worker), in a `__del__`. Unless the run has
    caught the stop within a second, deliver the signal to the main thread again."""

    run = _run["current"]

    def again() -> None:
        if run and _run["current"] == run and not _stop_caught.is_set():
            _thread.interrupt_main(signum)

    timer = threading.Timer(1.0, again)
    timer.daemon = True
    timer.start()


def _interrupt(signum, frame) -> None:
    # Ctrl-C reaches Ray's actors too, and Flower logs each that dies; be quiet first.
    _quiet_flower()
    _again_unless_caught(signum)
    raise KeyboardInterrupt


@contextmanager
def _quiet_before_ray_exits() -> Iterator[None]:
    """Ray's SIGTERM handler (installed by `ray.init`, replacing any other) exits at once,
    and on the way out Flower shuts Ray down while its worker threads still wait on client
    actors, logging each as a crash; wrap that handler so that Flower is quiet first."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:  # pragma: no cover - Ray comes with flwr[simulation]
        yield
        return
    install = ray_utils.set_sigterm_handler

    def install_quiet_first(handler):
        def quiet_first(signum, frame):
            _quiet_flower()
            _again_unless_caught(signum)
            handler(signum, frame)

        install(quiet_first)

    ray_utils.set_sigterm_handler = install_quiet_first
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install


@contextmanager
def stopped_with_the_run(out_dir: Path) -> Iterator[None]:
    """Around a simulation: first stop what killed earlier runs left, then make sure that
    this run's processes end with it, whether it finishes or is interrupted."""
    reaped = reap_leftovers()
    if reaped:
        print(
            f"stopped {len(reaped)} Ray processes that a killed earlier run left behind "
            f"(pids {', '.join(map(str, reaped))})",
            flush=True,
        )
    record = record_run()
    _stop_caught.clear()
    _run["started"] += 1
    _run["current"] = _run["started"]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    try:
        with _quiet_before_ray_exits():
            yield
    except (KeyboardInterrupt, SystemExit) as stop:
        # Ctrl-C arrives as KeyboardInterrupt; SIGTERM as the SystemExit that Ray's handler
        # (which replaces any other) raises.
        _stop_caught.set()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
            signal.signal(sig, signal.SIG_IGN)
        _quiet_flower()
        stop_descendants()
        signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM
        raise RunInterrupted(signum, out_dir) from None
    finally:
        _run["current"] = 0
        if record is not None:
            record.unlink(missing_ok=True)
        if main_thread and signal.getsignal(signal.SIGINT) is _interrupt:
            signal.signal(signal.SIGINT, previous)
