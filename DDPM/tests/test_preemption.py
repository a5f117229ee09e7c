"""Preemption: SIGTERM/SIGUSR1 (a cluster's notice before the kill) end the current iteration, save its
training state and exit with code 75; --resume then continues exactly as if nothing had happened.

The signal is real (os.kill to this process) and sent from inside iteration K, so the test does not
depend on timing."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import TINY

import train as train_script
from sfd_ddpm import preemption, training


def signal_during(monkeypatch, k: int, sig) -> list[int]:
    """Make the run send ``sig`` to itself during iteration ``k``; returns the iterations run."""
    real, ran = training.train, []

    def train(method, *args, **kwargs):
        step = method.train_step

        def signalled_step(i):
            ran.append(i)
            out = step(i)
            if i == k:
                os.kill(os.getpid(), sig)
            return out

        method.train_step = signalled_step
        return real(method, *args, **kwargs)

    monkeypatch.setattr(training, "train", train)
    return ran


def invoke(*args):
    return CliRunner().invoke(train_script.main, [str(a) for a in args])


def only_run(outdir):
    (run,) = [p for p in outdir.iterdir() if p.is_dir()]
    return run


def weights(run, step):
    return load_file(str(run / f"network-{step:07d}.safetensors"))


@pytest.fixture
def uncaught():
    """Handlers that record a signal the loop failed to catch (instead of killing the test session)."""
    got = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in preemption.SIGNALS}
    yield got
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("config,sig", [("builtin_train", signal.SIGTERM), ("builtin_sfd", signal.SIGUSR1)],
                         ids=["pretrain-SIGTERM", "sfd-SIGUSR1"])
def test_signal_saves_a_state_exits_75_and_resume_is_exact(tmp_path, tiny_teacher, monkeypatch, uncaught, config,
                                                           sig):
    args = ["--config", f"configs/{config}.yaml", *TINY, f"sfd.init={tiny_teacher}", "training.n_iters=4",
            "training.state_every=100", "training.snapshot_every=100"]  # no scheduled state before the end
    res = invoke(*args, "--outdir", tmp_path / "straight")
    assert res.exit_code == 0, res.output

    ran = signal_during(monkeypatch, 1, sig)
    res = invoke(*args, "--outdir", tmp_path / "stopped")
    assert res.exit_code == preemption.EXIT_PREEMPTED, res.output
    assert ran == [0, 1]  # the iteration that got the signal was finished, no other began
    assert f"stopped by {sig.name} after iteration 2 of 4" in res.output and "--resume" in res.output
    run = only_run(tmp_path / "stopped")
    assert sorted(p.name for p in run.glob("training-state*")) == ["training-state-0000002.pt"]
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "run.lock").exists()
    assert not uncaught
    os.kill(os.getpid(), sig)  # the loop's handler is gone with the loop: the previous one is back
    assert uncaught == [sig]

    monkeypatch.undo()
    res = invoke("--resume", run)
    assert res.exit_code == 0, res.output
    a, b = weights(only_run(tmp_path / "straight"), 4), weights(run, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # one torchrun launch of 2 ranks (~30-40 s on 2 shared cores)
@pytest.mark.subprocess
def test_ranks_stop_together_when_only_one_gets_the_signal(tmp_path):
    """torchrun, 2 ranks: rank 1 alone is signalled in iteration 1; both finish iteration 1 and stop, the
    state holds both ranks' random states, and torchrun reports exit code 75."""
    import subprocess
    import sys

    from conftest import TREE

    out = tmp_path / "runs"
    args = ["--config", TREE / "configs/builtin_train.yaml", "--outdir", out, *TINY, "training.n_iters=4",
            "training.state_every=100", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TREE / "tests/preempt_probe.py"),
           "1", "0", *map(str, args)]
    cwd = tmp_path / "probe"
    cwd.mkdir()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TREE)},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:  # ranks that disagree would hang in mismatched collectives: stop the whole group, not just torchrun
        _, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0 and "exitcode  : 75" in stderr, stderr  # torchrun reports a failure
    for rank in (0, 1):
        assert json.loads((cwd / f"rank{rank}.json").read_text()) == {"step": 1}, rank
    assert "stopped by a signal to another rank after iteration 1 of 4" in stderr  # rank 0's message
    run = only_run(out)
    state = torch.load(run / "training-state-0000001.pt", weights_only=True)
    assert state["step"] == 1 and len(state["rng"]) == 2
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1]
