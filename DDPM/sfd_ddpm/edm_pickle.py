"""Read NVIDIA EDM / SiD network pickles without running any of their code.

Those files are ``pickle.dump`` of ``{'ema': network, ...}`` where every network class is wrapped by
NVIDIA's ``torch_utils.persistence``: unpickling calls ``torch_utils.persistence._reconstruct_persistent_obj
(meta)``, which ``exec``s the Python source stored in ``meta['module_src']``. Here a restricted
unpickler resolves only

- the tensor rebuilds (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``; storages through
  ``torch.load(weights_only=True)`` instead of ``torch.storage._load_from_bytes``),
- plain containers (``collections.OrderedDict``, ``dnnlib.util.EasyDict`` read as a dict, set),
- the persistence reconstruction and torch module classes, both turned into inert :class:`ModuleRecord`
  objects (class name + attribute dict; the embedded source is never looked at, let alone executed),
- numpy scalars and dtypes (hyper-parameters such as skip_scale), turned into inert :class:`Opaque` values;

and refuses every other global with :class:`UnsafePickle`, naming it. The records are then walked into a
flat state dict with the usual ``a.b.weight`` names.
"""
from __future__ import annotations

import collections
import io
import os
import pickle

import torch


class UnsafePickle(pickle.UnpicklingError):
    """The pickle references something outside the allow-list."""


class NotANetworkPickle(ValueError):
    """The file is not an EDM/SiD network pickle at all (empty, HTML, zip, text, truncated, other object)."""


EXPECTED = ("expected an NVIDIA EDM network pickle such as edm-cifar10-32x32-cond-vp.pkl "
            "(https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/) or a SiD generator pickle")


class ModuleRecord:
    """What a pickled module becomes: its class name and its attribute dict, nothing callable."""

    def __init__(self, class_name: str, state: dict | None = None):
        self.class_name, self.state = class_name, dict(state or {})

    def __setstate__(self, state):  # BUILD of a non-persistent module (e.g. torch.nn.ModuleDict)
        self.state = dict(state) if isinstance(state, dict) else {"_raw": state}


class Opaque:
    """An inert stand-in for a numpy scalar or dtype: accepts its arguments, keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _record_class(name: str) -> type:
    return type(f"Record[{name}]", (ModuleRecord,), {"__new__": lambda cls, *a, **k: object.__new__(cls),
                                                         "__init__": lambda self, *a, **k: ModuleRecord.__init__(self, name)})


def _persistent(meta: dict) -> ModuleRecord:
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj: keeps the class name and state,
    ignores (never executes) meta['module_src']."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UnsafePickle("a torch_utils.persistence record without the expected class/state fields")
    return ModuleRecord(str(meta["class_name"]), meta["state"])


def _storage_from_bytes(data: bytes):
    """torch.storage._load_from_bytes with weights_only=True: a storage, nothing else."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor for the record classes this unpickler hands out, and nothing else."""
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord)):
        raise UnsafePickle(f"copyreg._reconstructor of {cls!r}")
    return cls()


def _newobj(cls, *args):
    if not (isinstance(cls, type) and issubclass(cls, (ModuleRecord, Opaque))):
        raise UnsafePickle(f"copyreg.__newobj__ of {cls!r}")
    return cls.__new__(cls)


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("builtins", "object"): object,
}
# numpy scalars/dtypes/arrays in hyper-parameter attributes: inert values (their values are not needed)
OPAQUE_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
OPAQUE_NAMES = ("scalar", "dtype", "_reconstruct", "ndarray")
# torch module classes that are pickled by reference (not persistent): records
MODULE_PREFIXES = ("torch.nn.modules.",)


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module in OPAQUE_MODULES and name in OPAQUE_NAMES:
            return Opaque
        if module.startswith(MODULE_PREFIXES) and name[:1].isupper():
            return _record_class(name)
        raise UnsafePickle(f"refused to load {module}.{name}: only tensors, plain containers and NVIDIA's "
                           f"persistent network records are allowed in an EDM/SiD network pickle")


def _not_a_pickle(head: bytes, size: int) -> str | None:
    """What a file that cannot be an EDM pickle is, judged from its first bytes (None: it may be one)."""
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch.save checkpoint?)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML page (a failed or redirected download?)"
    return None


def _unreadable(head: bytes, size: int, err: Exception) -> str:
    """What a file is whose unpickling broke off with ``err``."""
    if head[:1] != b"\x80":  # every pickle of protocol 2 or later (NVIDIA's files) starts with PROTO
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError:
            return f"not a pickle (it starts with bytes {head[:8].hex(' ')})"
    return f"a truncated or damaged pickle ({size} bytes; {type(err).__name__}: {err}; download it again)"


def load_pickle(path) -> dict:
    """The top-level dict of an EDM/SiD network pickle, with every network as a :class:`ModuleRecord`.

    A file that is not such a pickle raises :class:`NotANetworkPickle` saying what it is instead; a file that
    names a global outside the allow-list raises :class:`UnsafePickle`. Both name the file.
    """
    with open(path, "rb") as f:
        head, size = f.read(512), os.fstat(f.fileno()).st_size
        what = _not_a_pickle(head, size)
        if what is None:
            f.seek(0)
            try:
                data = RestrictedUnpickler(f).load()
            except UnsafePickle as err:
                raise UnsafePickle(f"{path}: {err}") from None
            except Exception as err:  # noqa: BLE001 - garbage makes the unpickler raise almost any type
                what = _unreadable(head, size, err)
    if what is None and data == torch.serialization.MAGIC_NUMBER:  # the first of torch.save's legacy pickles
        what = "a torch.save checkpoint (legacy format), not a persistence pickle"
    elif what is None and not isinstance(data, dict):
        what = f"a pickle of type {type(data).__name__}, not a dict of networks"
    if what is not None:
        raise NotANetworkPickle(f"{path} is {what}; {EXPECTED}")
    return data


def network_of(data: dict, key: str, path) -> ModuleRecord:
    """The network stored under ``key`` in a loaded pickle, or a clear error naming what is there."""
    if key not in data:
        raise NotANetworkPickle(f"{path} holds {sorted(map(str, data))}, not {key!r} (--network); {EXPECTED}")
    record = data[key]
    if not isinstance(record, ModuleRecord):
        raise NotANetworkPickle(f"{path} [{key}] is of type {type(record).__name__}, not a network; {EXPECTED}")
    return record


def state_dict(record: ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat state dict (parameters and persistent buffers) of a module record."""
    if not isinstance(record, ModuleRecord):
        raise UnsafePickle(f"expected a network at {prefix or 'the top'}, got {type(record).__name__}")
    s = record.state
    out = {}
    for name, p in (s.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = s.get("_non_persistent_buffers_set") or set()
    for name, b in (s.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, child in (s.get("_modules") or {}).items():
        if child is not None:
            out.update(state_dict(child, f"{prefix}{name}."))
    return out


def init_kwargs(record: ModuleRecord) -> dict:
    """The constructor arguments NVIDIA's persistence decorator stores with every network."""
    return dict(record.state.get("_init_kwargs") or {})
