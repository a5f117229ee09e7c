"""VDU (docs/method.md section 6): the regulariser's gradient, the plasticity bound, checkpoint precision, a real run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_script
from sfd_ddpm import config as C
from sfd_ddpm.checkpoints import save_weights
from sfd_ddpm.data import TensorImages, make_builtin
from sfd_ddpm.distributed import Dist
from sfd_ddpm.loading import load_network
from sfd_ddpm.methods.vdu import (VDU, checkpoint_precision, normalise_precision, plasticity_term,
                                  stability_term)
from sfd_ddpm.networks import build_network


def test_stability_gradient_is_gamma_lambda_delta():
    torch.manual_seed(0)
    theta = {"w": torch.randn(3, 4, requires_grad=True), "b": torch.randn(5, requires_grad=True)}
    mu = {n: torch.randn_like(p) for n, p in theta.items()}
    lam = {n: torch.rand_like(p) * 3 for n, p in theta.items()}
    gamma = 0.7
    value = stability_term(theta, mu, lam, gamma)
    value.backward()
    by_hand = 0.5 * gamma * sum(float((lam[n] * (theta[n].detach() - mu[n]) ** 2).sum()) for n in theta)
    assert value.item() == pytest.approx(by_hand, rel=1e-6)
    for n, p in theta.items():
        assert torch.allclose(p.grad, gamma * lam[n] * (p.detach() - mu[n]), atol=1e-6), n


def test_plasticity_is_bounded_by_the_hinge():
    lambda_p, target = 2.0, 5.0
    below = torch.tensor(3.0, requires_grad=True)
    plasticity_term(below, target, lambda_p).backward()
    assert below.grad.item() == pytest.approx(-lambda_p)  # raises the forget loss while below the target
    for value in (5.5, 1e6):
        above = torch.tensor(value, requires_grad=True)
        term = plasticity_term(above, target, lambda_p)
        term.backward()
        assert term.item() == pytest.approx(-lambda_p * target)  # bounded value
        assert above.grad.item() == 0.0  # no gradient past the bound
    # per-sample hinge (vdu.hinge=sample): only the samples below their own target get a gradient
    losses = torch.tensor([1.0, 9.0, 4.0, 30.0], requires_grad=True)
    targets = torch.tensor([2.0, 3.0, 5.0, 10.0])
    term = plasticity_term(losses, targets, lambda_p)
    term.backward()
    assert term.item() == pytest.approx(-lambda_p * (1.0 + 3.0 + 4.0 + 10.0) / 4)
    assert losses.grad.tolist() == pytest.approx([-lambda_p / 4, 0.0, -lambda_p / 4, 0.0])


def test_checkpoint_precision_is_inverse_variance():
    torch.manual_seed(1)
    states = [{"a": torch.randn(4), "b": torch.randn(2, 3)} for _ in range(3)]
    eps = 1e-3
    lam = checkpoint_precision(states, eps)
    for n in ("a", "b"):
        xs = [s[n] for s in states]
        mean = sum(xs) / 3
        var = sum((x - mean) ** 2 for x in xs) / (3 - 1)
        assert torch.allclose(lam[n], 1 / (var + eps), rtol=1e-5), n
    norm = normalise_precision(lam, "mean")
    assert float(torch.cat([v.flatten() for v in norm.values()]).mean()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        checkpoint_precision(states[:1], eps)


def _tiny_cfg(**vdu):
    cfg = C.load_config("configs/builtin_vdu.yaml", TINY)
    cfg["vdu"].update(vdu)
    return cfg


def _forget_data(n=8):
    x, y = make_builtin(n, 16, seed=3)
    keep = y == 0
    return TensorImages(x[keep], y[keep])


def test_vdu_precision_from_checkpoint_files(tmp_path):
    torch.manual_seed(2)
    cfg = _tiny_cfg()
    paths, states = [], []
    for k in range(3):
        net = build_network(cfg)
        save_weights(tmp_path / f"c{k}.safetensors", {"ema": net.state_dict()}, cfg, 1, "ddpm")
        paths.append(str(tmp_path / f"c{k}.safetensors"))
        states.append(dict(net.named_parameters()))
    cfg["vdu"].update(precision="checkpoints", checkpoints=paths, normalise="none", precision_eps=1e-4)
    vdu = VDU(cfg, Dist(), pretrained=build_network(cfg), forget_data=_forget_data())
    lam = vdu.compute_precision()
    for n, p in states[0].items():
        var = torch.stack([s[n].detach() for s in states]).var(0, unbiased=True)
        assert torch.allclose(lam[n], 1 / (var + 1e-4), rtol=1e-5), n


def test_no_plasticity_gradient_past_the_bound_in_a_real_step():
    """gamma = 0 and a target below the pretrained loss: the step changes nothing; a high target does."""
    torch.manual_seed(3)
    cfg = _tiny_cfg(gamma=0.0, fisher_samples=2, fisher_timesteps=2, fisher_steps=2)
    cfg["training"]["grad_clip"] = 0.0
    base = build_network(cfg)
    for hinge, ratio, should_move in (("batch", 1e-6, False), ("batch", 100.0, True), ("sample", 1e-6, False),
                                      ("sample", 100.0, True)):
        net = build_network(cfg)
        net.load_state_dict(base.state_dict())
        cfg["vdu"].update(target_ratio=ratio, hinge=hinge)
        vdu = VDU(cfg, Dist(), pretrained=net, forget_data=_forget_data())
        vdu.start(0)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        vdu.train_step(0)
        moved = any(not torch.equal(before[n], p) for n, p in net.named_parameters())
        assert moved == should_move, (hinge, ratio)


def test_unconditional_network_ignores_labels():
    torch.manual_seed(4)
    cfg = C.load_config(None, TINY + ["model.conditional=false"])
    net = build_network(cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    out = [net(x, t, torch.tensor([c, c])) for c in (0, 3, 10)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    cond = build_network(C.load_config(None, TINY)).eval()
    cond.load_state_dict(net.state_dict())
    cond.unet.class_embedding.weight.data.normal_()
    assert not torch.equal(cond(x, t, torch.tensor([0, 0])), cond(x, t, torch.tensor([3, 3])))


def test_bad_vdu_settings_fail_clearly():
    for bad, match in (({"precision": "bogus"}, "vdu.precision"), ({"precision": "checkpoints"}, "at least 2"),
                       ({"forget": [12]}, "out of range"), ({"normalise": "max"}, "vdu.normalise"),
                       ({"hinge": "x"}, "vdu.hinge")):
        with pytest.raises(ValueError, match=match):
            VDU(_tiny_cfg(**bad), Dist(), pretrained=build_network(_tiny_cfg()), forget_data=_forget_data())
    with pytest.raises(ValueError, match="forget_subset"):
        cfg = _tiny_cfg(forget_subset=10 ** 6)
        VDU(cfg, Dist(), pretrained=build_network(cfg))


def test_vdu_run_and_exact_resume(tiny_teacher, tmp_path):
    """train.py method=vdu on the tiny teacher: weights, log, a loadable DDPM; 2 + resume 2 == 4 straight."""
    args = ["--config", "configs/builtin_vdu.yaml", *TINY, f"vdu.init={tiny_teacher}", "vdu.forget_subset=16",
            "vdu.fisher_samples=4", "vdu.fisher_timesteps=4", "vdu.fisher_steps=2", "vdu.target_draws=1"]
    run_script("train.py", "--outdir", tmp_path / "a", *args, "training.n_iters=4")
    run_script("train.py", "--outdir", tmp_path / "b", *args, "training.n_iters=2")
    (run_a,), (run_b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    run_script("train.py", "--resume", run_b, "training.n_iters=4")
    a = load_file(run_a / "network-0000004.safetensors")
    b = load_file(run_b / "network-0000004.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    teacher = load_file(tiny_teacher)
    assert any(not torch.equal(a[k], teacher[k]) for k in a if k.startswith("net."))  # it trained
    log = [json.loads(line) for line in (run_a / "log.jsonl").read_text().splitlines()]
    assert {"loss", "forget_loss", "stability"} <= set(log[-1]) and log[-1]["step"] == 4
    net, cfg, meta = load_network(run_a / "network-0000004.safetensors")
    assert meta["kind"] == "ddpm" and cfg["method"] == "vdu"
    bad = run_script("train.py", "--outdir", tmp_path / "c", *args, "vdu.precision=bogus", check=False)
    assert bad.returncode != 0 and "vdu.precision" in bad.stderr


def test_vdu_and_unconditional_configs_load():
    for name in ("mnist_vdu", "cifar10_vdu", "builtin_vdu"):
        assert C.load_config(f"configs/{name}.yaml")["method"] == "vdu"
    for name, size, channels in (("mnist_uncond_train", 28, 1), ("cifar10_uncond_train", 32, 3)):
        cfg = C.load_config(f"configs/{name}.yaml")
        assert cfg["model"]["conditional"] is False
        assert (cfg["data"]["image_size"], cfg["data"]["channels"]) == (size, channels)


def test_unconditional_pretraining_then_vdu(tmp_path):
    """model.conditional=false through train.py, then VDU on the unconditional checkpoint."""
    run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", tmp_path / "p", *TINY,
               "model.conditional=false", "training.n_iters=2")
    (pre,) = (tmp_path / "p").iterdir()
    ckpt = pre / "network-0000002.safetensors"
    run_script("train.py", "--config", "configs/builtin_vdu.yaml", "--outdir", tmp_path / "v", *TINY,
               f"vdu.init={ckpt}", "vdu.forget_subset=8", "vdu.fisher_samples=2", "vdu.fisher_timesteps=2",
               "vdu.fisher_steps=2", "vdu.target_draws=1", "training.n_iters=2")
    (run,) = (tmp_path / "v").iterdir()
    net, cfg, _ = load_network(run / "network-0000002.safetensors")
    assert cfg["model"]["conditional"] is False and net.conditional is False
