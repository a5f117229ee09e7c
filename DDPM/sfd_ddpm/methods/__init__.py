"""Training methods. Each is a class with ``start``, ``train_step``, ``weights``, ``state_dict`` and
``sample_grids``; :func:`sfd_ddpm.training.train` runs any of them."""
from __future__ import annotations


# Baselines of SPEC section 5: method name -> (module, class).
BASELINES = {"retrain": ("retrain", "Retrain"), "sa": ("sa", "SelectiveAmnesia"), "salun": ("salun", "SalUn"),
             "esd": ("esd", "ESD")}


def get_method(name: str):
    if name == "pretrain":
        from .pretrain import Pretrain
        return Pretrain
    if name in ("sfd", "sid"):
        from .sfd import SFD
        return SFD
    if name == "vdu":
        from .vdu import VDU
        return VDU
    if name in BASELINES:
        import importlib
        module, cls = BASELINES[name]
        return getattr(importlib.import_module(f".{module}", __name__), cls)
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS + tuple(BASELINES))}")


METHODS = ("pretrain", "sid", "sfd", "vdu")
