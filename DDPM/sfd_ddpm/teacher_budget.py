"""A teacher sized to the user's class folder (demo.py and compare.py with --data-root).

The built-in dataset's teacher has a fixed, known-good budget (configs/builtin_train.yaml, 800
iterations). A folder's size is the user's, so its teacher is trained in **epochs**, in chunks of
RULE["check_every_epochs"], each chunk a real `train.py` command (the first a fresh run, every later
one `train.py --resume RUN training.n_iters=N`, so the run folder is an ordinary resumable run). After
each chunk the newest EMA snapshot is **checked**: RULE["check_per_class"] images of every class,
unguided (w = 0), DDIM-RULE["check_ddim_steps"] with eta 0 and x0 clipped, sampling seed CHECK_SEED,
labelled by the evaluation classifier. Training stops at the first of:

- ``accuracy``: the classifier labels at least RULE["stop_accuracy"] (0.90) of those samples as the
  class they were asked for (all classes together);
- ``time``: the elapsed time plus the last chunk's (training and check) would exceed the budget
  (``--teacher-minutes``);
- ``max_epochs``: RULE["max_epochs"] epochs were reached.

Every check goes to ``teacher_checks.json`` in the teacher's run folder (rewritten after each check,
``finished`` true once stopped, with the reason and the final checkpoint); the demo report quotes it.

The resolution follows the images: the median shorter side of the folder's images (read from the
file headers of up to SIZE_SAMPLE files), capped at MAX_IMAGE_SIZE (the demo UNet's limit on a CPU
budget) and rounded down to a multiple of 4 (the UNet halves it twice), at least 8.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

RULE = {"check_every_epochs": 3, "check_per_class": 10, "check_ddim_steps": 20, "stop_accuracy": 0.90,
        "max_epochs": 100}
QUICK_RULE = {"check_every_epochs": 1, "check_per_class": 2, "check_ddim_steps": 2, "stop_accuracy": 0.90,
              "max_epochs": 2}
CHECK_SEED = 12345      # a sampling seed none of the report's seeds (0, 1, 2, ...) uses
MAX_IMAGE_SIZE = 32
QUICK_MAX_IMAGE_SIZE = 16
SIZE_SAMPLE = 200
CHECKS_FILE = "teacher_checks.json"
# The snapshot grid after every chunk, smaller than builtin_train.yaml's (it is drawn at every check).
GRID = ["grid.per_class=4", "grid.steps=20"]


def native_image_size(root, limit: int = MAX_IMAGE_SIZE) -> int:
    """The resolution a folder's teacher trains at: the median shorter side of up to SIZE_SAMPLE of its
    images (spread over the classes), capped at ``limit``, rounded down to a multiple of 4, at least 8."""
    from PIL import Image

    from .folder_data import scan
    files = [p for p, _ in scan(root)["files"]["train"]]
    step = max(1, len(files) // SIZE_SAMPLE)
    sides = []
    for path in files[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except OSError:
            continue
    side = int(statistics.median(sides)) if sides else limit
    return max(8, min(side, limit) // 4 * 4)


def iterations_for(epochs: int, n_train: int, batch: int) -> int:
    """Iterations of ``epochs`` passes over ``n_train`` images at ``batch`` images per iteration."""
    return max(1, math.ceil(epochs * n_train / batch))


def check_teacher(ckpt, clf_path, forget: int, per_class: int, steps: int) -> dict:
    """The classifier's accuracy on the teacher's own unguided samples: overall, per class, on the forget
    class and on the remaining classes."""
    import torch

    from .classifiers import load_classifier
    from .demo_report import generate
    x, y, _, _ = generate(ckpt, per_class, "ddim", steps=steps, guidance=0.0, clip_x0=True, seed=CHECK_SEED)
    clf, _ = load_classifier(clf_path)
    with torch.no_grad():
        pred = torch.cat([clf(x[k:k + 256]).argmax(1) for k in range(0, len(x), 256)])
    right = (pred == y).float()
    per = [float(right[y == c].mean()) for c in range(int(y.max()) + 1)]
    return {"accuracy": float(right.mean()), "forget_acc": per[forget],
            "remaining_acc": float(right[y != forget].mean()), "per_class_accuracy": per}


def train_sized_teacher(parent: Path, train_cmd: list, n_train: int, batch: int, minutes: float, clf_path, forget: int,
                        run, rule: dict = RULE, clock=time.perf_counter, check=check_teacher) -> dict:
    """Train the teacher in chunks of epochs under ``parent`` (``run(cmd)`` runs one train.py command;
    ``train_cmd`` is the first one without its n_iters), checking after each chunk, until the stop rule
    of the module docstring. Returns the record written to RUN/teacher_checks.json."""
    parent = Path(parent)
    t0 = clock()
    checks, run_dir, epochs = [], None, 0
    record = {"rule": {**rule, "check_seed": CHECK_SEED, "sampler": "ddim, eta 0, x0 clipped, w = 0"},
              "budget_minutes": minutes, "n_train": n_train, "batch_size": batch, "checks": checks,
              "finished": False}
    while True:
        target = min(epochs + rule["check_every_epochs"], rule["max_epochs"])
        iters = iterations_for(target, n_train, batch)
        t_chunk = clock()
        if run_dir is None:
            before = set(parent.glob("*")) if parent.exists() else set()
            run([*train_cmd, f"training.n_iters={iters}", "training.snapshot_every=1000000000",
                 "training.state_every=1000000000"])
            (run_dir,) = set(parent.glob("*")) - before
        else:
            run(["train.py", "--resume", run_dir, f"training.n_iters={iters}"])
        ckpt = run_dir / f"network-{iters:07d}.safetensors"
        measured = check(ckpt, clf_path, forget, rule["check_per_class"], rule["check_ddim_steps"])
        epochs = target
        now = clock()
        checks.append({"epoch": epochs, "iteration": iters, "seconds": now - t0, "chunk_seconds": now - t_chunk,
                       "checkpoint": ckpt.name, **measured})
        reason = ("accuracy" if measured["accuracy"] >= rule["stop_accuracy"] else
                  "max_epochs" if epochs >= rule["max_epochs"] else
                  "time" if (now - t0) + (now - t_chunk) > minutes * 60 else None)
        record.update(finished=reason is not None, stop_reason=reason, epochs=epochs, iterations=iters,
                      seconds=now - t0, checkpoint=str(ckpt))
        (run_dir / CHECKS_FILE).write_text(json.dumps(record, indent=2))
        if reason:
            return record


def finished_sized_teacher(parent: Path) -> Path | None:
    """The final checkpoint of the newest finished sized teacher under ``parent`` (None: there is none)."""
    runs = sorted(p for p in Path(parent).glob("*") if (p / CHECKS_FILE).exists()) if Path(parent).exists() else []
    for run_dir in reversed(runs):
        rec = json.loads((run_dir / CHECKS_FILE).read_text())
        if rec.get("finished") and Path(rec["checkpoint"]).exists():
            return Path(rec["checkpoint"])
    return None


def stop_sentence(rec: dict) -> str:
    """One line for the report: how long the teacher trained, why it stopped, its last check."""
    last = rec["checks"][-1]
    why = {"accuracy": f"its samples reached the stop accuracy {rec['rule']['stop_accuracy']:.2f}",
           "time": f"the next chunk would not fit the {rec['budget_minutes']:g}-minute budget",
           "max_epochs": f"it reached the {rec['rule']['max_epochs']}-epoch cap"}[rec["stop_reason"]]
    trail = ", ".join(f"{c['epoch']}: {c['accuracy']:.2f}" for c in rec["checks"])
    return (f"Teacher sized to the folder: {rec['epochs']} epochs ({rec['iterations']} iterations at batch "
            f"{rec['batch_size']} over {rec['n_train']} training images) in {rec['seconds'] / 60:.1f} min; stopped "
            f"because {why}. The classifier's accuracy on its unguided check samples (epoch: accuracy): {trail}; "
            f"at the last check forget class {last['forget_acc']:.2f}, remaining classes {last['remaining_acc']:.2f} "
            f"(teacher_checks.json).")
