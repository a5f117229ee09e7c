"""One writer per run directory, and a clean start after a killed one.

* ``lock``: a ``run.lock`` file (created exclusively, holding host and pid) stops a second process from
  writing the same run, e.g. two ``--resume`` of one run; a lock whose process is gone is taken over.
* ``remove_stale_temporaries``: the ``.NAME.XXXX.tmp`` files a killed atomic write leaves.
* ``truncate_log``: on resume, drop the ``log.jsonl`` lines after the resumed step (they are redone).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .checkpoints import atomic_write, remove_stale_temporaries

LOCK_FILE = "run.lock"

__all__ = ["RunLocked", "lock", "unlock", "remove_stale_temporaries", "truncate_log"]


class RunLocked(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock(run_dir) -> Path:
    """Take the run's lock or raise RunLocked naming the process that holds it."""
    path = Path(run_dir) / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                path.unlink(missing_ok=True)  # its process is gone (killed): take over
                continue
            raise RunLocked(f"{run_dir} is being written by another process ({holder.get('host', '?')} pid "
                            f"{holder.get('pid', '?')}); wait for it to finish, or delete {path} if it is not "
                            f"running") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunLocked(f"could not take the lock {path}; delete it if no process is writing {run_dir}")


def unlock(run_dir) -> None:
    path = Path(run_dir) / LOCK_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def truncate_log(run_dir, step: int) -> int:
    """Keep the ``log.jsonl`` records up to ``step`` (the resumed iteration); return how many were dropped."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    if len(kept) != len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
    return len(lines) - len(kept)
