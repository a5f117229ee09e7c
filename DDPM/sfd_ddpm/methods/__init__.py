"""Training methods. Each is a class with ``start``, ``train_step``, ``weights``, ``state_dict`` and
``sample_grids``; :func:`sfd_ddpm.training.train` runs any of them."""
from __future__ import annotations

import importlib

# method name -> (module, class); modules are imported on demand so `--help` stays fast.
REGISTRY = {
    "pretrain": ("pretrain", "Pretrain"),
    "sid": ("sfd", "SFD"),            # SiD distillation: SFD with nothing forgotten
    "sfd": ("sfd", "SFD"),
    "vdu": ("vdu", "VDU"),
    # baselines of docs/method.md section 5
    "retrain": ("retrain", "Retrain"),
    "sa": ("sa", "SelectiveAmnesia"),
    "salun": ("salun", "SalUn"),
    "esd": ("esd", "ESD"),
}
METHODS = tuple(REGISTRY)


def get_method(name: str):
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)
