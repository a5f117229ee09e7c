"""Semantic test: SFD really forgets a word and keeps the others (ISSUE 7 acceptance).

Latents are synthetic: the prompt's word (cat, dog, bird, fish) picks a +-1 pattern P_w in the 4x8x8
latent space and x0 | prompt ~ N(P_w, 0.3^2 I). The teacher is exact for that data: a
``GaussianTextScore`` (tests/gaussian_text.py) with the UNet call signature, whose per-prompt mean and
variance are a linear map of the tiny CLIP text encoder's hidden states, fitted by least squares. (A
tiny UNet trained on such data within CPU minutes learns to read the class from x_t, not from the
text, so its one-step output follows the seed; the exact teacher removes that problem, as in the DDPM
tree's semantic test.) Fake score and generator start as trainable copies of the teacher.

SFD then runs through the real SD code: ``build_prompt_sampler`` / ``guidance_settings`` from a
``TrainConfig`` (forget prompts from a file, override by substituting "cat" -> "dog", remain prompts
from a file), ``GuidedDenoiser`` + ``PromptEncoder`` over the real tokenizer and text encoder loaded by
``load_sd_parts``, and ``SFDStep`` (routing, fake-score and SiD losses, Adam steps, EMA); only the
network is swapped. Guidance scales are 1 (no CFG), so the target of every term is exact.

Measured on the generator's one-step latents (256 seeds per prompt): the RMS distance of each
prompt's mean latent to every pattern, the fraction of samples nearest to a pattern, and the spread
(per-element std over seeds; the data's is 0.3, the teacher's one-step output has 0.036).
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

WORDS = ("cat", "dog", "bird", "fish")
TEMPLATES = ("a photo of a {}", "a picture of a {}", "a painting of a {}", "a {} on a table", "a {} in a park")
SHAPE = (4, 8, 8)
DATA_STD = 0.3
ITERATIONS = 2000


def patterns() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.sign(torch.randn(len(WORDS), *SHAPE, generator=g))  # entries +-1; RMS distance ~1.41 apart


@pytest.fixture(scope="module")
def setup(tiny_sd_dir, tmp_path_factory):
    return make_setup(tiny_sd_dir, tmp_path_factory.mktemp("semantic"))


def make_setup(tiny_sd_dir, folder):
    """The exact teacher and the prompt files (also used by the LoRA mode's test, tests/test_lora.py)."""
    from gaussian_text import GaussianTextScore

    from sfd_sd.denoiser import PromptEncoder, VPSchedule
    from sfd_sd.models import load_sd_parts

    parts = load_sd_parts(str(tiny_sd_dir), load_vae=False, load_unet=False)  # real tokenizer + text encoder
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, "cpu")
    pats = patterns()
    prompts = [t.format(w) for w in WORDS for t in TEMPLATES] + [""]
    means = torch.stack([pats[i // len(TEMPLATES)] for i in range(len(prompts) - 1)] + [pats.mean(0)])
    hidden = encoder(prompts)
    teacher = GaussianTextScore(parts.alphas_cumprod, hidden.shape[1], hidden.shape[2], SHAPE)
    teacher.fit(hidden, means, DATA_STD ** 2).requires_grad_(False).eval()
    fitted_mean, fitted_var = teacher.stats(hidden)
    assert (fitted_mean - means.flatten(1)).abs().max() < 1e-3 and torch.allclose(fitted_var, torch.tensor(0.09), atol=1e-3)
    (folder / "remain.txt").write_text("\n".join(t.format(w) for w in WORDS[1:] for t in TEMPLATES) + "\n")
    (folder / "forget.txt").write_text("\n".join(t.format("cat") for t in TEMPLATES) + "\n")
    return dict(parts=parts, encoder=encoder, teacher=teacher, pats=pats, folder=folder,
                schedule=VPSchedule(parts.alphas_cumprod))


# LoRA mode (tests/test_lora.py): rank-16 adapters on the text map. Learning rates tried (fake, generator):
# 1e-3/3e-4 and 3e-3/1e-3 leave the remain prompts' spread at the teacher's 0.035; 3e-3/5e-4: 0.07-0.09;
# 3e-3/3e-4 (used): 0.12-0.14; 5e-3/5e-4, 1e-2/3e-3, and 3e-3/3e-4 for 3000 iterations diverge.
LORA = dict(lora_rank=16, lora_alpha=16.0, lora_targets=["proj"], lr_fake=3e-3, lr_gen=3e-4)


def run_sfd(setup, forget_weight: float, adapter: str = "full"):
    """SFD forgetting "cat" into "dog" through the real SD training step; returns the EMA generator.
    ``adapter="lora"``: fake score and generator are the teacher + LoRA adapters (sfd_sd/lora.py)."""
    from sfd_sd.config import TrainConfig
    from sfd_sd.denoiser import GuidedDenoiser
    from sfd_sd.distributed import Dist
    from sfd_sd.training import Nets, SFDStep, build_prompt_sampler, guidance_settings

    folder = setup["folder"]
    settings = dict(
        remain_prompts=str(folder / "remain.txt"), forget_prompts=str(folder / "forget.txt"),
        concept_to_forget="cat", concept_to_override="dog",
        kappa_fake_train=1.0, kappa_fake_eval=1.0, kappa_teacher=1.0,
        alpha=1.2, batch=16, lr_fake=2e-4, lr_gen=6e-5, ema_halflife_kimg=0.5,
        w_fake_forget=forget_weight, w_gen_forget=forget_weight, seed=0)
    cfg = TrainConfig(**(dict(settings, adapter="lora", **LORA) if adapter == "lora" else settings))
    cfg.check()
    sampler, _, _ = build_prompt_sampler(cfg)
    assert sampler.pairs == [(t.format("cat"), t.format("dog")) for t in TEMPLATES]
    torch.manual_seed(0)
    teacher = setup["teacher"]
    mk = lambda net: GuidedDenoiser(net, setup["schedule"], setup["encoder"])  # noqa: E731
    if adapter == "lora":
        from sfd_sd import lora

        teacher, fake, gen, fake_params, gen_params = lora.build_lora_nets(teacher, None, cfg, torch.float32, "cpu",
                                                                           share_generator_base=True)
        ema, ema_params = lora.ema_copy(gen)
        nets = Nets(teacher=mk(teacher), fake=mk(fake), generator=mk(gen), ema=ema, fake_params=fake_params,
                    gen_params=gen_params, ema_params=ema_params)
    else:
        fake = copy.deepcopy(teacher).requires_grad_(True)
        gen = copy.deepcopy(teacher).requires_grad_(True)
        ema = copy.deepcopy(gen).requires_grad_(False)
        nets = Nets(teacher=mk(teacher), fake=mk(fake), generator=mk(gen), ema=ema)
    opt_kw = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps_for("fp32"))
    opt_fake = torch.optim.Adam(nets.params("fake"), lr=cfg.lr_fake, **opt_kw)
    opt_gen = torch.optim.Adam(nets.params("gen"), lr=cfg.lr_gen, **opt_kw)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = SFDStep(cfg, nets, sampler, guidance_settings(cfg), Dist(), opt_fake, opt_gen, scaler, scaler,
                   torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), SHAPE)
    assert not step.g.dropout_active  # kappa = 1: one conditional pass, no prompt dropout
    nimg = 0
    for _ in range(ITERATIONS):
        losses = step(nimg)
        nimg += cfg.batch
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    return mk(ema)


@torch.no_grad()
def measure(setup, generator) -> dict[str, dict[str, torch.Tensor]]:
    """Per word: RMS distance of each prompt's mean latent to each pattern (templates x words), the
    fraction of samples nearest to each pattern (words), and the spread of each prompt (templates)."""
    from sfd_sd.denoiser import one_step_generate
    from sfd_sd.generation import seed_noise

    pats = setup["pats"].flatten(1)
    z = seed_noise(range(256), SHAPE)
    out = {}
    for w in WORDS:
        x = torch.stack([one_step_generate(generator, z, [t.format(w)] * len(z), 625).flatten(1) for t in TEMPLATES])
        dist = (x.mean(1)[:, None] - pats[None]).square().mean(2).sqrt()
        nearest = torch.cdist(x.flatten(0, 1), pats).argmin(1)
        out[w] = dict(dist=dist, nearest=torch.bincount(nearest, minlength=len(WORDS)) / len(nearest),
                      spread=x.std(1).mean(1))
    return out


def summary(m) -> str:
    return "; ".join(f"{w}: dist to {'/'.join(WORDS)} {[round(v, 3) for v in r['dist'].mean(0).tolist()]}, "
                     f"spread {r['spread'].min():.3f}-{r['spread'].max():.3f}" for w, r in m.items())


def check_keeps(m, word: str, target: str, min_spread: float = 0.15) -> None:
    """``word`` prompts draw the ``target`` pattern: every prompt's mean near it, far from the others,
    nearly every sample nearest to it, spread neither collapsed nor blown up (data: 0.3)."""
    r, k = m[word], WORDS.index(target)
    others = [j for j in range(len(WORDS)) if j != k]
    assert r["dist"][:, k].max() < 0.35, (word, target, r["dist"])
    assert r["dist"][:, others].min() > 1.0, (word, target, r["dist"])
    assert r["nearest"][k] > 0.98, (word, target, r["nearest"])
    assert (r["spread"] > min_spread).all() and (r["spread"] < 0.45).all(), (word, r["spread"])


@pytest.mark.slow
def test_sfd_forgets_cat_into_dog_and_keeps_others(setup):
    t0 = time.time()
    before = measure(setup, _teacher_denoiser(setup))
    for w in WORDS:  # the teacher's own one-step output follows the prompt's word
        assert before[w]["dist"][:, WORDS.index(w)].max() < 0.05 and before[w]["nearest"][WORDS.index(w)] == 1.0
    assert (before["cat"]["spread"] < 0.05).all()  # teacher one-step: 0.036, far below the data's 0.3
    after = measure(setup, run_sfd(setup, forget_weight=1.0))
    print(f"\nbefore: {summary(before)}\nafter:  {summary(after)}\n({time.time() - t0:.0f}s)")
    check_keeps(after, "cat", "dog")
    assert after["cat"]["dist"][:, 1].max() < 0.25 and after["cat"]["nearest"][0] == 0.0
    for w in ("dog", "bird", "fish"):
        check_keeps(after, w, w)


@pytest.mark.slow
def test_without_forget_terms_cat_prompts_keep_cat(setup):
    """Control: the same run with both forget weights 0 leaves cat prompts on the cat pattern, so the
    movement above is caused by the forget terms (not by drift of the shared text map)."""
    t0 = time.time()
    after = measure(setup, run_sfd(setup, forget_weight=0.0))
    print(f"\nno forget terms: {summary(after)}\n({time.time() - t0:.0f}s)")
    for w in WORDS:
        check_keeps(after, w, w)


def _teacher_denoiser(setup):
    from sfd_sd.denoiser import GuidedDenoiser

    return GuidedDenoiser(setup["teacher"], setup["schedule"], setup["encoder"])
