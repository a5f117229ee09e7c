"""Optional experiment trackers beside log.jsonl (which stays the record): ``--report-to tensorboard``.

TensorBoard is an optional extra (``pip install tensorboard``); asking for it without it installed
fails at the start of the run, before any model is loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ConfigError

CHOICES = ("none", "tensorboard")


def check_available(report_to: str) -> None:
    if report_to not in CHOICES:
        raise ConfigError(f"--report-to {report_to!r}: choose one of {', '.join(CHOICES)}")
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or drop the option; log.jsonl is always written)") from None


class NullReporter:
    def scalars(self, record: dict, nimg: int) -> None:
        pass

    def images(self, grids: dict, nimg: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(NullReporter):
    """Numbers of each log.jsonl record and the one-step grids, indexed by images seen."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, record: dict, nimg: int) -> None:
        for key, value in record.items():
            if key not in ("time", "images_seen") and isinstance(value, (int, float)):
                group = "loss" if key.startswith("loss_") else "perf"
                self.writer.add_scalar(f"{group}/{key}", value, global_step=nimg)
        self.writer.flush()

    def images(self, grids: dict, nimg: int) -> None:
        for name, grid in grids.items():
            self.writer.add_image(f"grid/{name}", np.asarray(grid), global_step=nimg, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_reporter(report_to: str, run_dir: Path, is_main: bool) -> NullReporter:
    """The tracker for rank 0 (others get a no-op); TensorBoard writes to ``<run_dir>/tensorboard``."""
    if not is_main or report_to == "none":
        return NullReporter()
    return TensorBoardReporter(Path(run_dir) / "tensorboard")
