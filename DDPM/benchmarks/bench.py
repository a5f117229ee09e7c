#!/usr/bin/env python
"""Throughput benchmark: pretraining, sampling and SFD, at the built-in and CIFAR-10 model sizes.

Prints ratios measured in this one run (nothing is hard-coded):
  * pretraining images/s and sampling images/s (DDIM step rate, one-step generator);
  * SFD iteration time / sum of the isolated network passes one iteration needs (target <= 1.15):
    phi step = generator forward (no grad) + fake-score forward/backward; theta step = generator
    forward/backward + fake-score and teacher forward/backward through their inputs;
  * SFD iteration time with the batched remain+forget passes vs separate passes;
  * one-step vs 1000-step ancestral sampling throughput (target >= 500x). The ancestral sampler costs
    the same per step, so on a CPU its time is measured over --ancestral-steps steps and scaled to
    1000 (said so in the output); on a GPU pass --ancestral-steps 1000.

  python benchmarks/bench.py                  # both sizes, CPU or the GPU if present
  python benchmarks/bench.py --size builtin --batch 64
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfd_ddpm import config as C  # noqa: E402
from sfd_ddpm.diffusion import Denoiser, eps_loss, schedule_of  # noqa: E402
from sfd_ddpm.distributed import Dist  # noqa: E402
from sfd_ddpm.losses import fake_score_loss, generator_loss  # noqa: E402
from sfd_ddpm.methods.sfd import SFD  # noqa: E402
from sfd_ddpm.networks import build_network, count_parameters  # noqa: E402
from sfd_ddpm.samplers import NoiseStreams, ddpm_ancestral, one_step  # noqa: E402

SIZES = {"builtin": "configs/builtin_train.yaml", "cifar10": "configs/cifar10_train.yaml",
         "builtin_edm": "configs/builtin_edm_train.yaml", "cifar10_edm": "configs/cifar10_edm_train.yaml"}


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def bench_size(size: str, batch: int, repeats: int, ancestral_steps: int, device) -> None:
    cfg = C.load_config(SIZES[size], ["data.download=false"])
    sched = schedule_of(cfg)
    net = build_network(cfg).to(device)
    d = cfg["data"]
    shape = (d["channels"], d["image_size"], d["image_size"])
    print(f"\n== {size}: {count_parameters(net) / 1e6:.2f}M parameters, {shape}, batch {batch}, {device} ==")
    den = Denoiser(net, sched, net.null_label)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = torch.randn(batch, *shape, device=device).clamp(-1, 1)
    label = torch.randint(0, 10, (batch,), device=device)

    t_gen = sched.generator_level(cfg["sfd"])  # t* (DDPM) or sigma_init (EDM)
    t_mid = sched.sample_range(1, 500, 501, "cpu")[0].item()  # one mid-range level

    def pretrain_step():
        loss = eps_loss(den, x0, label, sched.sample_train(batch, device), torch.randn_like(x0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = timed(pretrain_step, device, repeats)
    print(f"pretraining step          {t * 1e3:9.1f} ms   {batch / t:10.1f} images/s")

    net.eval()
    with torch.no_grad():
        t_fwd = timed(lambda: den.eps(x0, t_mid, label), device, repeats)
        t_one = timed(lambda: one_step(den, label, torch.randn_like(x0), t_gen), device, repeats)
    print(f"one network evaluation    {t_fwd * 1e3:9.1f} ms   DDIM-100: {batch / (100 * t_fwd):8.2f} images/s, "
          f"EDM Heun-18 (35 NFE): {batch / (35 * t_fwd):8.2f} images/s")
    print(f"one-step generator        {t_one * 1e3:9.1f} ms   {batch / t_one:10.1f} images/s")
    if "ddpm" in sched.samplers:
        ancestral_ratio(net, sched, den, label, shape, batch, repeats, ancestral_steps, device, t_gen)
    sfd_ratio(cfg, shape, batch, repeats, device)


def ancestral_ratio(net, sched, den, label, shape, batch, repeats, ancestral_steps, device, t_gen) -> None:
    n_anc = min(batch, 16)
    seeds = list(range(n_anc))
    sched_short = copy.copy(sched)
    sched_short.num_timesteps = ancestral_steps  # the sampler's loop length; per-step cost is unchanged
    t0 = time.perf_counter()
    ddpm_ancestral(Denoiser(net, sched_short, net.null_label), label[:n_anc], NoiseStreams(seeds, shape, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_anc = (time.perf_counter() - t0) * 1000 / ancestral_steps
    with torch.no_grad():
        t_one_small = timed(lambda: one_step(den, label[:n_anc], torch.randn(n_anc, *shape, device=device), t_gen),
                            device, repeats)
    scaled = "" if ancestral_steps == 1000 else f" (timed over {ancestral_steps} steps, scaled to 1000)"
    print(f"1000-step ancestral       {n_anc / t_anc:10.3f} images/s{scaled}")
    print(f"one-step / ancestral      {t_anc / t_one_small:10.0f}x  (batch {n_anc}; target >= 500x)")


def sfd_ratio(cfg, shape, batch, repeats, device) -> None:
    """SFD iteration vs its isolated passes, with the EDM configs' SiD levels where the backbone is EDM."""
    half = batch // 2  # remain + forget = batch images per network pass
    for batched in (True, False):
        sfd_cfg = copy.deepcopy(cfg)
        sfd_cfg["method"] = "sfd"
        sfd_cfg["training"]["batch_size"] = half
        sfd_cfg["sfd"]["batched"] = batched
        if cfg["model"]["arch"] == "songunet":  # the EDM configs' SiD settings (cifar10_edm_sfd.yaml)
            sfd_cfg["sfd"].update(t_min=0, t_max=800, fake_score_levels="pretrain")
        teacher = build_network(cfg)
        method = SFD(sfd_cfg, Dist(device=device), networks=(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher)))
        step = [0]

        def iteration():
            method.train_step(step[0])
            step[0] += 1

        t_iter = timed(iteration, device, repeats)
        if batched:
            t_batched = t_iter
            t_parts = isolated_passes(method, batch, shape, device, repeats)
        else:
            t_separate = t_iter
    print(f"SFD iteration (batched)   {t_batched * 1e3:9.1f} ms   {half / t_batched:8.1f} remain images/s")
    print(f"SFD iteration (separate)  {t_separate * 1e3:9.1f} ms   batched/separate = {t_batched / t_separate:.2f}")
    print(f"isolated passes, summed   {t_parts * 1e3:9.1f} ms   iteration / passes = {t_batched / t_parts:.2f} (target <= 1.15)")


def isolated_passes(method: SFD, n: int, shape, device, repeats: int) -> float:
    """Sum of the network passes one SFD iteration needs, each timed alone on n = remain + forget images."""
    gen, fake, teacher = method.generator, method.fake_frozen, method.teacher
    label = torch.randint(0, 10, (n,), device=device)
    t = method._t(n, False, False)

    def gen_forward_nograd():
        with torch.no_grad():
            one_step(gen, label, torch.randn(n, *shape, device=device), method.t_init)

    def fake_dsm_forward_backward():
        with torch.no_grad():
            x = torch.randn(n, *shape, device=device)
        fake_score_loss(method.fake_train, x, label, t, torch.randn_like(x)).mean().backward()

    def generator_step_passes():
        x_g = one_step(gen, label, torch.randn(n, *shape, device=device), method.t_init)
        method.fake_net.requires_grad_(False)
        generator_loss(teacher, fake, x_g, t, torch.randn_like(x_g), label, label, 1.2).mean().backward()
        method.fake_net.requires_grad_(True)

    return sum(timed(f, device, repeats) for f in (gen_forward_nograd, fake_dsm_forward_backward,
                                                   generator_step_passes))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--size", type=click.Choice(["both", "all", *SIZES]), default="both",
              help="both = builtin and cifar10 (DDPM UNet); all = also the EDM SongUNet sizes")
@click.option("--batch", type=click.IntRange(min=2), default=None, help="[default: 64 builtin, 16 cifar10 on CPU, 128 on GPU]")
@click.option("--repeats", type=click.IntRange(min=1), default=5)
@click.option("--ancestral-steps", type=click.IntRange(1, 1000), default=None,
              help="Ancestral steps actually timed [default: 1000 on GPU, 100 builtin / 10 cifar10 on CPU]")
def main(size, batch, repeats, ancestral_steps):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in {"both": ["builtin", "cifar10"], "all": list(SIZES)}.get(size, [size]):
        small = name.startswith("builtin")
        b = batch or (128 if device.type == "cuda" else 64 if small else 16)
        steps = ancestral_steps or (1000 if device.type == "cuda" else 100 if small else 10)
        bench_size(name, b, repeats, steps, device)


if __name__ == "__main__":
    main()
