"""Messages (the project's `LOGGER`), training logs: results.csv (one row per epoch, safe across resumes) and
TensorBoard scalars."""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
from pathlib import Path

LOGGER_NAME = "yolov5"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a message is logged, so redirection and pytest's capture see it."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the live sys.stdout is always used
        pass


class _MessageFormatter(logging.Formatter):
    """Plain text for information, 'WARNING: ...' / 'ERROR: ...' above it (the form the scripts always printed)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        prefix = getattr(record, "prefix", "")  # e.g. 'val: ', kept in front: `val: WARNING: ...`
        return f"{prefix}{record.levelname}: {text}" if record.levelno >= logging.WARNING else prefix + text


def _make_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(_MessageFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


LOGGER = _make_logger()


def set_verbosity(quiet: bool = False, rank: int = -1) -> None:
    """--quiet, and DDP ranks other than 0, keep only warnings and errors (every rank runs the same code)."""
    LOGGER.setLevel(logging.WARNING if quiet or rank > 0 else logging.INFO)

RESULT_KEYS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "metrics/APs", "metrics/APm", "metrics/APl",
    "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)


def colorstr(*args: str) -> str:
    """Wrap the last argument in ANSI colour codes (first arguments name them), YOLOv5-style prefixes."""
    *styles, text = args if len(args) > 1 else ("blue", "bold", args[0])
    codes = {"black": "30", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35", "cyan": "36",
             "white": "37", "bold": "1", "underline": "4"}
    if os.getenv("NO_COLOR") or os.getenv("CI"):
        return text
    return "".join(f"\033[{codes[s]}m" for s in styles) + text + "\033[0m"


class ResultsLogger:
    """Appends one row per epoch to results.csv and to TensorBoard; `start_epoch` drops rows a resume redoes."""

    def __init__(self, save_dir: Path, start_epoch: int = 0, tensorboard: bool = True):
        self.csv = Path(save_dir) / "results.csv"
        # a resumed run keeps the file's own columns (e.g. one started with other --sizes bins)
        self._columns = self._truncate(start_epoch)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(save_dir))
            except Exception as e:  # logging must never stop a training run
                LOGGER.warning(f"TensorBoard logging disabled ({e})")

    def _truncate(self, start_epoch: int) -> list[str] | None:
        """Keep only rows of epochs before start_epoch, so a resumed run has no duplicated epochs; returns the
        file's value columns (None when there is no file yet)."""
        if not self.csv.exists():
            return None
        with open(self.csv, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return None
        kept = [rows[0]] + [r for r in rows[1:] if r and r[0].strip().isdigit() and int(r[0]) < start_epoch]
        if len(kept) != len(rows):
            tmp = self.csv.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            os.replace(tmp, self.csv)
        return rows[0][1:]

    def log(self, epoch: int, values: dict[str, float]) -> None:
        new = not self.csv.exists() or self.csv.stat().st_size == 0
        if new or self._columns is None:  # the first row written fixes the columns
            self._columns = list(values)
        if self._columns != list(values):
            values = {k: values.get(k, float("nan")) for k in self._columns}
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", *values.keys()])
            w.writerow([epoch, *(f"{float(v):.5g}" for v in values.values())])
            f.flush()
            os.fsync(f.fileno())
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), epoch)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


class WarningsOnly(io.TextIOBase):
    """A stdout for the non-zero DDP ranks: only WARNING and ERROR lines get through (to `target`).

    Every rank runs the same code; without this, a 2-process run prints each message twice.
    """

    def __init__(self, target=None):
        self.target = target or sys.stderr
        self._line = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            if "WARNING" in line or "ERROR" in line:
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()
