"""Preemption: SIGTERM/SIGUSR1 (a cluster's notice before the kill) end the current iteration, log it,
save its training state and exit with code 75; --resume then continues exactly.

The signal is real (os.kill to this process) and sent from inside an iteration, so the test does not
depend on timing."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

from test_train import base_args

# 2 iterations of 2 images; no log line, state or snapshot scheduled before the end
RUN_ARGS = ("duration_kimg=0.004", "tick_kimg=1", "snap_kimg=1", "state_kimg=1", "seed=1")


def invoke(args):
    from train import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def uncaught():
    """Handlers that record a signal the loop failed to catch (instead of killing the test session)."""
    from sfd_sd import preemption

    got = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in preemption.SIGNALS}
    yield got
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def signal_during(monkeypatch, k: int, sig) -> list[int]:
    """Send ``sig`` to this process during iteration ``k``; returns the images seen at each iteration run."""
    from sfd_sd import training

    real, ran = training.SFDStep.__call__, []

    def step(self, cur_nimg):
        ran.append(cur_nimg)
        out = real(self, cur_nimg)
        if len(ran) == k + 1:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(training.SFDStep, "__call__", step)
    return ran


def test_sigterm_saves_a_state_exits_75_and_resume_is_exact(tiny_sd_dir, tmp_path, monkeypatch, uncaught):
    from sfd_sd import checkpoints, preemption

    sig = signal.SIGTERM
    res = invoke(base_args(tiny_sd_dir, tmp_path / "straight", *RUN_ARGS))
    assert res.exit_code == 0, res.output
    (straight,) = (tmp_path / "straight").iterdir()

    ran = signal_during(monkeypatch, 0, sig)
    res = invoke(base_args(tiny_sd_dir, tmp_path / "stopped", *RUN_ARGS))
    assert res.exit_code == preemption.EXIT_PREEMPTED, (res.output, res.exception)
    assert ran == [0]  # the iteration that got the signal was finished, no other began
    assert f"stopped by {sig.name} after 2 of 4 images" in res.output and "--resume" in res.output
    (run,) = (tmp_path / "stopped").iterdir()
    assert [p.name for p in checkpoints.training_states(run)] == ["training-state-000000002.pt"]
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [2]  # the finished iteration is logged, not lost
    assert not uncaught
    os.kill(os.getpid(), sig)  # the loop's handler is gone with the loop: the previous one is back
    assert uncaught == [sig]

    monkeypatch.undo()
    res = invoke(base_args(tiny_sd_dir, tmp_path / "stopped", *RUN_ARGS, "--resume", run))
    assert res.exit_code == 0, res.output
    a = torch.load(straight / "training-state-000000004.pt", weights_only=True)
    b = torch.load(run / "training-state-000000004.pt", weights_only=True)
    for net in ("generator", "fake_score"):
        assert a[net].keys() == b[net].keys() and all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [2, 4]


def test_sigusr1_is_caught_too_and_restored_after(uncaught):
    """SLURM's --signal=USR1@N: the same flag as SIGTERM; one process agrees with itself."""
    from sfd_sd import distributed, preemption

    with preemption.StopSignal() as stop:
        assert not stop.agreed(distributed.Dist())
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGUSR1" and stop.agreed(distributed.Dist())  # the first signal is named
    assert not uncaught
    os.kill(os.getpid(), signal.SIGUSR1)
    assert uncaught == [signal.SIGUSR1]


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo process group of one process (its barrier is a real collective), destroyed afterwards."""
    import torch.distributed as tdist

    yield lambda: tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    if tdist.is_initialized():
        tdist.destroy_process_group()


def test_no_rank_exits_75_before_rank_0_is_done(tmp_path, monkeypatch, one_process_group):
    """torchrun SIGTERMs every other worker as soon as one exits non-zero: each rank waits at a barrier
    after rank 0 has written the state and printed the resume hint, and only then leaves with 75."""
    import click
    import torch.distributed as tdist

    from sfd_sd import preemption, training

    events = []

    def fake_train(cfg):  # what _train does up to the stop: join the group, write the state, raise
        one_process_group()
        events.append("state written")
        raise preemption.Preempted("stopped by SIGTERM after 2 of 4 images; continue with --resume", 2)

    def recorded(name, real):
        return lambda *a, **k: (events.append(name), real(*a, **k))[1]

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(click, "echo", recorded("resume hint printed", click.echo))
    monkeypatch.setattr(tdist, "barrier", recorded("barrier", tdist.barrier))
    monkeypatch.setattr(tdist, "destroy_process_group", recorded("group destroyed", tdist.destroy_process_group))
    res = invoke(base_args(tmp_path / "no-model", tmp_path / "runs", *RUN_ARGS))
    assert res.exit_code == preemption.EXIT_PREEMPTED, (res.output, res.exception)
    assert events == ["state written", "resume hint printed", "barrier", "group destroyed"]
    assert "preempted: stopped by SIGTERM" in res.output
