"""What goes to a log file: no terminal colour codes, no progress bars redrawn line after
line. Set before transformers and Ray start (they read the environment once)."""

import os
import sys


def plain_when_logged() -> None:
    """A log file (stdout or stderr not a terminal): colour codes and redrawn bars off."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: its bar switch is read at import
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
