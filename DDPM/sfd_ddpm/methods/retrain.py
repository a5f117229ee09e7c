"""Retrain (docs/method.md section 5): pretraining from scratch on the remaining classes only, the gold standard
of unlearning. Exactly :class:`Pretrain` with ``baseline.forget`` left out of the training data."""
from __future__ import annotations

from ..distributed import Dist
from .pretrain import Pretrain


class Retrain(Pretrain):
    def __init__(self, cfg: dict, dist: Dist):
        forget = tuple(cfg["baseline"]["forget"])
        if not forget:
            raise ValueError("method retrain needs at least one class in baseline.forget")
        super().__init__(cfg, dist, exclude_classes=forget)
