"""Run under torchrun by the tests: train.py where only rank R sends itself SIGTERM during iteration K
(as when a cluster's signal reaches the ranks at different moments); each rank writes the iteration
it stopped after to rank<r>.json in the working directory. Usage:
preempt_probe.py R K [train.py arguments...]"""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from sfd_ddpm import training  # noqa: E402
from sfd_ddpm.preemption import Preempted  # noqa: E402

signal_rank, signal_iter = int(sys.argv[1]), int(sys.argv[2])
real_train = training.train


def train_with_signal(method, *args, **kwargs):
    step = method.train_step

    def signalled_step(i):
        out = step(i)
        if i == signal_iter and int(os.environ.get("RANK", "0")) == signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    method.train_step = signalled_step
    try:
        return real_train(method, *args, **kwargs)
    except Preempted as stop:
        Path(f"rank{os.environ['RANK']}.json").write_text(json.dumps({"step": stop.step}))
        raise


training.train = train_with_signal
train.main(sys.argv[3:])
