"""LoRA mode (adapter=lora, issue 24) on the tiny SD models: what trains, what stays, exact start and resume,
the adapter file diffusers loads, the memory plan."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import SD_DIR

PROMPTS = SD_DIR / "prompts"


def lora_args(sd_dir, outdir, *extra):
    return [f"sd_model={sd_dir}", f"remain_prompts={PROMPTS / 'remain_prompts_small.txt'}",
            f"forget_prompts={PROMPTS / 'brad_pitt_prompts.txt'}", "concept_to_forget=brad pitt",
            "concept_to_override=a middle aged man", "resolution=16", "batch=2", "grad_checkpointing=false",
            "adapter=lora", "lora_rank=4", "lora_alpha=8", "lr_fake=1e-2", "lr_gen=1e-2", f"outdir={outdir}", *extra]


def build_run(sd_dir, generator_init, *extra):
    from sfd_sd.config import load_config
    from sfd_sd.distributed import Dist
    from sfd_sd.training import SFDStep, build, build_prompt_sampler, guidance_settings

    cfg = load_config(overrides=lora_args(sd_dir, "unused", f"generator_init={generator_init}", *extra))
    cfg.check()
    run = build(cfg, Dist(), "fp32")
    sampler, _, _ = build_prompt_sampler(cfg)
    step = SFDStep(cfg, run.nets, sampler, guidance_settings(cfg), Dist(), run.opt_fake, run.opt_gen,
                   run.scaler_fake, run.scaler_gen, run.prompt_gen, run.noise_gen, run.latent_shape)
    return cfg, run, step


def _base(module):
    return {n: p for n, p in module.named_parameters() if ".lora_" not in n}


def test_only_adapters_train_and_the_base_weights_stay_bit_identical(tiny_sd_dir, converted_generator):
    from diffusers import UNet2DConditionModel

    cfg, run, step = build_run(tiny_sd_dir, converted_generator)
    nets = run.nets
    teacher, fake, gen = nets.teacher.unet, nets.fake.unet, nets.generator.unet
    assert not [n for n, _ in teacher.named_parameters() if ".lora_" in n]  # the teacher has no adapter layers
    # The fake score is the teacher's weights (the same tensors, not a copy) + its adapter.
    assert all(p is _base(teacher)[n.replace(".base_layer", "")] for n, p in _base(fake).items())
    start = UNet2DConditionModel.from_pretrained(converted_generator).state_dict()
    assert all(torch.equal(p, start[n.replace(".base_layer", "")]) for n, p in _base(gen).items())
    # Adam and the trainable flags cover the adapter tensors only.
    for opt, which, module in ((run.opt_fake, "fake", fake), (run.opt_gen, "gen", gen)):
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in nets.params(which)} == {id(p) for n, p in module.named_parameters()
                                                                 if ".lora_" in n}
    before = {name: {n: p.detach().clone() for n, p in m.named_parameters()}
              for name, m in (("teacher", teacher), ("gen", gen))}
    adapters = {n: p.detach().clone() for n, p in gen.named_parameters() if ".lora_" in n}

    step.fake_step(0)
    assert all(p.grad is not None for p in nets.params("fake"))
    assert all(p.grad is None for m in (teacher, gen) for p in m.parameters())
    assert all(p.grad is None for p in _base(fake).values())
    step.generator_step(0)
    assert all(p.grad is not None for p in nets.params("gen"))
    assert all(p.grad is None for p in [*_base(gen).values(), *teacher.parameters()])
    step(2)
    for name, m in (("teacher", teacher), ("gen", gen)):
        for n, p in m.named_parameters():
            if ".lora_" not in n:
                assert torch.equal(p, before[name][n]), (name, n)
    assert all(not p.requires_grad for p in [*teacher.parameters(), *_base(gen).values(), *_base(fake).values()])
    assert any(not torch.equal(adapters[n], p) for n, p in gen.named_parameters() if ".lora_" in n)  # it trained


def test_zero_adapter_starts_exactly_at_the_generator_start(tiny_sd_dir, converted_generator, tiny_parts):
    from sfd_sd.denoiser import GuidedDenoiser, one_step_generate
    from sfd_sd.models import load_generator_init

    cfg, run, step = build_run(tiny_sd_dir, converted_generator)
    nets = run.nets
    plain = GuidedDenoiser(load_generator_init(str(converted_generator), tiny_parts.unet).eval(),
                           nets.generator.schedule, nets.generator.encoder)
    z = torch.randn(3, *run.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "brad pitt", "a dog in a park"]
    with torch.no_grad():
        x_start = one_step_generate(plain, z, prompts, cfg.t_init)
        assert torch.equal(one_step_generate(nets.generator, z, prompts, cfg.t_init), x_start)
        t = torch.tensor([100, 500, 900])
        assert torch.equal(nets.fake.eps(z, t, prompts, 4.5), nets.teacher.eps(z, t, prompts, 4.5))
    step(0)
    with torch.no_grad():  # the adapter is in the forward: one step moves the output
        assert (one_step_generate(nets.generator, z, prompts, cfg.t_init) - x_start).abs().max() > 1e-4


def test_lora_knobs_reach_peft(tiny_sd_dir):
    """lora_rank, lora_alpha, lora_targets and lora_dropout each show in the injected layers."""
    from peft.tuners.lora import LoraLayer

    cfg, run, _ = build_run(tiny_sd_dir, "teacher", "lora_rank=3", "lora_alpha=6", "lora_dropout=0.25",
                            "lora_targets=[to_k, to_v]")
    for unet in (run.nets.fake.unet, run.nets.generator.unet):
        layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
        assert layers and {n.rsplit(".", 1)[-1] for n in layers} == {"to_k", "to_v"}
        for m in layers.values():
            (name,) = m.r.keys()
            assert m.r[name] == 3 and m.scaling[name] == 2.0 and m.lora_dropout[name].p == 0.25
            assert m.lora_A[name].weight.shape[0] == 3 and not m.lora_B[name].weight.any()
    # generator_init=teacher: the generator's base is the teacher's tensors too (no second copy)
    teacher = _base(run.nets.teacher.unet)
    assert all(p is teacher[n.replace(".base_layer", "")] for n, p in _base(run.nets.generator.unet).items())


def test_a_wrong_target_is_named(tiny_sd_dir):
    from sfd_sd.config import ConfigError

    with pytest.raises(ConfigError, match="lora_targets .*no module"):
        build_run(tiny_sd_dir, "teacher", "lora_targets=[to_qq]")


def test_teacher_gradient_is_the_teachers_with_checkpointing(tiny_sd_dir):
    """The generator loss backpropagates through the teacher; with checkpointing its blocks are recomputed
    in backward. The teacher's input gradient must be the base model's, not the adapted fake score's."""
    import copy

    from sfd_sd.models import load_sd_parts

    _, run, _ = build_run(tiny_sd_dir, "teacher", "grad_checkpointing=true")
    nets = run.nets
    with torch.no_grad():
        for p in nets.params("fake"):  # an adapter that really changes the fake score
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    plain = copy.deepcopy(load_sd_parts(str(tiny_sd_dir)).unet).eval()
    x = torch.randn(2, *run.latent_shape, generator=torch.Generator().manual_seed(1))
    t, prompts = torch.tensor([300, 700]), ["a photo of a cat", "brad pitt"]
    emb = nets.teacher.encoder(prompts)

    def input_grad(unet):
        xi = x.clone().requires_grad_(True)
        unet(xi, t, encoder_hidden_states=emb).sample.square().sum().backward()
        return xi.grad

    assert nets.teacher.unet.is_gradient_checkpointing and nets.fake.unet.is_gradient_checkpointing
    want = input_grad(plain)
    assert torch.allclose(input_grad(nets.teacher.unet), want, atol=1e-5, rtol=1e-5)
    assert (input_grad(nets.fake.unet) - want).abs().max() > 1e-3  # the adapter matters for the fake score


def _state(run_dir, nimg):
    return torch.load(run_dir / f"training-state-{nimg:09d}.pt", weights_only=True)


def test_resume_is_bit_exact_and_states_hold_adapters_only(tiny_sd_dir, tmp_path):
    """N steps straight == N/2 steps, resume, N/2 steps; lora_dropout > 0 so the global random stream
    (peft's dropout) must be restored too; EMA over adapter tensors."""
    from train import main

    extra = ["generator_init=teacher", "lora_dropout=0.2", "ema_halflife_kimg=0.01", "snap_kimg=0.004",
             "state_kimg=0.004", "tick_kimg=0.004", "seed=3"]
    res = CliRunner().invoke(main, lora_args(tiny_sd_dir, tmp_path / "a", "duration_kimg=0.008", *extra))
    assert res.exit_code == 0, res.output
    run_a = next((tmp_path / "a").glob("00000-*"))
    res = CliRunner().invoke(main, lora_args(tiny_sd_dir, tmp_path / "b", "duration_kimg=0.004", *extra))
    assert res.exit_code == 0, res.output
    run_b = next((tmp_path / "b").glob("00000-*"))
    res = CliRunner().invoke(main, ["--resume", str(run_b), "duration_kimg=0.008"])
    assert res.exit_code == 0, res.output
    a, b = _state(run_a, 8), _state(run_b, 8)
    for key in ("fake_score", "generator", "generator_ema"):
        assert a[key] and all(".lora_" in k for k in a[key]), key  # adapter tensors only, no base weight
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("opt_fake", "opt_gen"):
        sa, sb = a[key]["state"], b[key]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][s], sb[i][s]) for i in sa for s in ("exp_avg",
                                                                                                   "exp_avg_sq"))
    first = _state(run_a, 4)
    assert not all(torch.equal(first["generator"][k], a["generator"][k]) for k in a["generator"])
    assert not all(torch.equal(a["generator"][k], a["generator_ema"][k]) for k in a["generator"])
    n_adapter = sum(v.numel() for v in a["generator"].values())
    n_unet = sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(
        tiny_sd_dir, subfolder="unet").parameters())
    assert n_adapter < n_unet / 5
    # A resume with another rank is refused before training (the state's adapter does not fit).
    res = CliRunner().invoke(main, ["--resume", str(run_b), "duration_kimg=0.01", "lora_rank=2",
                                    "--allow-changed-settings"])
    assert res.exit_code != 0 and "adapter does not match" in res.output


@pytest.fixture(scope="module")
def lora_snapshot(tiny_sd_dir, converted_generator, tmp_path_factory):
    """A LoRA run on the tiny model from the converted tiny SiD-LSG start; rank 4, alpha 8 (scale 2)."""
    from train import main

    out = tmp_path_factory.mktemp("lora-runs")
    res = CliRunner().invoke(main, lora_args(tiny_sd_dir, out, f"generator_init={converted_generator}",
                                             "duration_kimg=0.004", "snap_kimg=0.004", "state_kimg=0.004"),
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return next(out.glob("00000-*/network-snapshot-000000004"))


def _generate(network, outdir, *extra):
    from generate import main as generate

    res = CliRunner().invoke(generate, ["--network", str(network), "--prompt", "a photo of a cat", "--seeds", "0-1",
                                        "--resolution", "16", "--outdir", str(outdir), *map(str, extra)])
    assert res.exit_code == 0, res.output
    return [np.asarray(Image.open(outdir / "a-photo-of-a-cat" / f"{s:05d}.png")).astype(int) for s in (0, 1)]


def test_exported_adapter_loads_with_load_lora_weights_and_matches_generate(lora_snapshot, converted_generator,
                                                                            tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from export import main as export

    snap_files = sorted(p.name for p in lora_snapshot.iterdir())
    assert snap_files == ["pytorch_lora_weights.safetensors", "sfd_generator.json"]  # no UNet copy
    out = tmp_path / "export"
    res = CliRunner().invoke(export, ["--snapshot", str(lora_snapshot), "--out", str(out), "--license",
                                      "creativeml-openrail-m"])
    assert res.exit_code == 0, res.output
    adapter = out / "forget_adapter"
    assert {p.name for p in adapter.iterdir()} == {"pytorch_lora_weights.safetensors", "sfd_generator.json",
                                                   "README.md"}
    ref = _generate(adapter, tmp_path / "g-adapter")
    for other, folder in ((lora_snapshot, "g-snap"), (out, "g-merged")):  # snapshot, merged export: the same images
        for a, b in zip(_generate(other, tmp_path / folder), ref):
            assert np.abs(a - b).max() <= 1, other

    # A fresh pipeline of the generator start (not the base model's UNet) + load_lora_weights.
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(converted_generator)
    start = pipe(["a photo of a cat"] * 2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                 output_type="np").images
    pipe.load_lora_weights(str(adapter))
    assert pipe.unet.peft_config  # loaded by diffusers' LoRA loader
    ours = pipe(["a photo of a cat"] * 2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                output_type="np").images
    for s in (0, 1):
        assert np.abs(np.round(ours[s] * 255).astype(int) - ref[s]).max() <= 1
    assert np.abs(np.round(start[0] * 255).astype(int) - ref[0]).max() > 5  # the adapter changed the image

    # The merged export is the same generator, loaded with the documented snippet.
    merged = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    img = merged("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(np.round(img * 255).astype(int) - ref[0]).max() <= 1

    # The adapter's card: base model, concept, override, rank and size.
    card = (adapter / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", card, re.S).group(1))
    from safetensors.torch import load_file

    n = sum(v.numel() for v in load_file(adapter / "pytorch_lora_weights.safetensors").values())
    assert meta["sfd"]["concept_forgotten"] == "brad pitt" and meta["sfd"]["concept_override"] == "a middle aged man"
    assert (meta["sfd"]["lora_rank"], meta["sfd"]["lora_alpha"], meta["sfd"]["adapter_parameters"]) == (4, 8.0, n)
    assert meta["sfd"]["adapter_bytes"] == (adapter / "pytorch_lora_weights.safetensors").stat().st_size
    assert str(SD_DIR) not in card and "load_lora_weights" in card and f"{n:,} parameters" in card
    assert json.loads((adapter / "sfd_generator.json").read_text())["adapter"] == "lora"


def test_generate_needs_the_generator_start_of_an_adapter(lora_snapshot, tmp_path):
    from generate import main as generate

    res = CliRunner().invoke(generate, ["--network", str(lora_snapshot), "--generator-base", str(tmp_path / "nope"),
                                        "--prompt", "a cat", "--seeds", "0", "--outdir", str(tmp_path / "g")])
    assert res.exit_code != 0 and "--generator-base" in res.output and not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------------- memory plan
def test_memory_plan_lora_fits_a_consumer_gpu_and_the_readme_shows_it():
    from sfd_sd import memory

    n = memory.adapter_parameters(["to_q", "to_k", "to_v", "to_out.0"], 16)
    assert n == 3_188_736  # SD v1.5, rank 16 on the attention projections: 16 x (in + out) summed
    lora = memory.plan("lora", 1, True, n)
    assert lora["peak_gb"] < 16 and 3.5 < lora["static_total_gb"] < 4.5
    full = memory.plan("full", 1, True, 0)
    assert 29 < full["static_total_gb"] < 31 and full["peak_gb"] > 30  # the README's full-mode plan
    assert all(memory.plan("lora", b, c, n)["peak_gb"] < 16 for b in (1, 2) for c in (True, False))
    readme = (SD_DIR / "README.md").read_text()
    assert memory.markdown(memory.table()) in readme  # the README's rows are this computation's


# ---------------------------------------------------------------------------------- semantic
@pytest.mark.slow
def test_lora_sfd_forgets_cat_into_dog_and_keeps_others(tiny_sd_dir, tmp_path_factory):
    """The full mode's semantic test (tests/test_semantic.py) with LoRA adapters on the exact teacher's text
    map: forgetting under the full mode's thresholds; the remain prompts keep their pattern under the full
    mode's thresholds (mean distance, nearest pattern). NOT the same: their one-step spread, the width
    the distillation gives (data 0.3, teacher start 0.036), reaches 0.12-0.14 where the full mode's test
    asks > 0.15; checked here at > 0.1 (see LORA in test_semantic.py for the learning rates tried)."""
    import test_semantic as sem

    setup = sem.make_setup(tiny_sd_dir, tmp_path_factory.mktemp("semantic-lora"))
    after = sem.measure(setup, sem.run_sfd(setup, forget_weight=1.0, adapter="lora"))
    print(f"\nLoRA: {sem.summary(after)}")
    sem.check_keeps(after, "cat", "dog")
    assert after["cat"]["dist"][:, 1].max() < 0.25 and after["cat"]["nearest"][0] == 0.0
    for w in ("dog", "bird", "fish"):
        sem.check_keeps(after, w, w, min_spread=0.1)


def test_peft_is_imported_by_the_lora_code_path_only():
    """peft is pinned for adapter=lora; no other module imports it, and loading the code does not."""
    import subprocess
    import sys

    users = sorted(str(p.relative_to(SD_DIR)) for p in SD_DIR.rglob("*.py") if "tests" not in p.parts
                   and re.search(r"^\s*(from|import) peft\b", p.read_text(), re.M))
    assert users == ["sfd_sd/lora.py"]
    lora_src = (SD_DIR / "sfd_sd" / "lora.py").read_text()
    assert not re.search(r"^(from|import) peft\b", lora_src, re.M)  # inside functions only
    code = ("import sys; import sfd_sd.training, sfd_sd.lora, sfd_sd.export, sfd_sd.generation, train, generate, "
            "export; print('peft' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=SD_DIR, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


def test_disk_plan_counts_adapters_only(tiny_sd_dir):
    """A LoRA run's states and snapshots hold adapter tensors: the disk plan says so before any model loads."""
    from sfd_sd import disk, memory
    from sfd_sd.config import load_config

    full = load_config(overrides=[a for a in lora_args(tiny_sd_dir, "x") if not a.startswith(("adapter", "lora_"))])
    lora = load_config(overrides=lora_args(tiny_sd_dir, "x", "ema_halflife_kimg=0.5"))
    unet_config = {k: v for k, v in __import__("diffusers").UNet2DConditionModel.load_config(
        tiny_sd_dir, subfolder="unet").items() if not k.startswith("_")}
    n = memory.adapter_parameters(lora.lora_targets, lora.lora_rank, unet_config)
    plan = disk.plan_for_run(lora, 0)
    assert (plan.state_bytes, plan.snapshot_bytes) == (2 * 3 * 4 * n + 4 * n, 4 * n)
    assert disk.plan_for_run(full, 0).snapshot_bytes == 4 * disk.unet_parameters(str(tiny_sd_dir), None) > 5 * 4 * n
