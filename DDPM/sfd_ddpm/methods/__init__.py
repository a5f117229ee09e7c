"""Training methods. Each is a class with ``start``, ``train_step``, ``weights``, ``state_dict`` and
``sample_grids``; :func:`sfd_ddpm.training.train` runs any of them."""
from __future__ import annotations


def get_method(name: str):
    if name == "pretrain":
        from .pretrain import Pretrain
        return Pretrain
    if name in ("sfd", "sid"):
        from .sfd import SFD
        return SFD
    raise ValueError(f"unknown method {name!r}; choose pretrain, sid or sfd")


METHODS = ("pretrain", "sid", "sfd")
