"""Targeted mutation run over the SD method code (a small stand-in for mutmut on 2 shared cores).

Each mutation breaks one line the way a slip would (operator, constant, argument, missing detach,
swapped knob), is applied alone, and the fast tests run; a mutation that passes every test
*survives*. Run from SD/:

    ../.venv/bin/python tests/mutation_check.py            # all
    ../.venv/bin/python tests/mutation_check.py omega,ckpt # those whose name contains "omega" or "ckpt"

Not collected by pytest (no ``test_`` prefix). The files are restored after each mutation, also on
Ctrl-C. A mutation whose text no longer occurs exactly once is *stale*: the tool refuses to run (exit 3)
and names it, so the list is kept in step with the code (tests/test_mutation_lists.py checks this in CI).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SD = Path(__file__).resolve().parents[1]
FAST_TESTS = ["tests/test_reference.py", "tests/test_units.py", "tests/test_checkpoints.py", "tests/test_convert.py",
              "tests/test_faults.py", "tests/test_generate.py", "tests/test_train.py", "tests/test_recipes.py",
              "tests/test_config_ranges.py", "tests/test_lora.py", "tests/test_preemption.py::test_no_rank_exits_75_before_rank_0_is_done",
              "tests/test_evaluate.py::test_damaged_png_is_one_line_naming_the_file", "-m", "not slow"]

# (name, file, original text, mutated text)
MUTATIONS = [
    # losses.py
    ("fake-loss: generator not stopped", "sfd_sd/losses.py", "add_noise(x_g.detach(), eps, t)", "add_noise(x_g, eps, t)"),
    ("fake-loss: eps_hat + eps", "sfd_sd/losses.py", "(eps_hat - eps).square()", "(eps_hat + eps).square()"),
    ("fake-loss: abs instead of square", "sfd_sd/losses.py", "(eps_hat - eps).square()", "(eps_hat - eps).abs()"),
    ("fake-loss: mean instead of sum", "sfd_sd/losses.py", "square().flatten(1).sum(1)", "square().flatten(1).mean(1)"),
    ("sid: omega not detached", "sfd_sd/losses.py", ".clamp_min(1e-5).detach()", ".clamp_min(1e-5)"),
    ("sid: omega clamp 1e-1", "sfd_sd/losses.py", ".clamp_min(1e-5)", ".clamp_min(1e-1)"),
    ("sid: omega from f_phi", "sfd_sd/losses.py", "omega = (f_psi - x_g)", "omega = (f_phi - x_g)"),
    ("sid: omega sum not mean", "sfd_sd/losses.py", ".abs().flatten(1).mean(1)", ".abs().flatten(1).sum(1)"),
    ("sid: alpha forced to 1", "sfd_sd/losses.py", "- alpha * diff", "- 1.0 * diff"),
    ("sid: alpha sign", "sfd_sd/losses.py", "- alpha * diff", "+ alpha * diff"),
    ("sid: (f_phi - x_g) term", "sfd_sd/losses.py", "((f_psi - x_g) - alpha", "((f_phi - x_g) - alpha"),
    ("sid: multiply by omega", "sfd_sd/losses.py", "return per / omega", "return per * omega"),
    ("sid: x_t without noise", "sfd_sd/losses.py", "add_noise(x_g, eps, t)", "add_noise(x_g, eps * 0, t)"),
    ("sid: teacher at fake prompts", "sfd_sd/losses.py", "f_psi = teacher.x0(x_t, t, teacher_prompts", "f_psi = teacher.x0(x_t, t, fake_prompts"),
    ("sid: teacher guidance = fake's", "sfd_sd/losses.py", "teacher_prompts, teacher_guidance,", "teacher_prompts, fake_guidance,"),
    ("masked_sum: mean over kept", "sfd_sd/losses.py", "per_sample[keep].sum() / normaliser", "per_sample[keep].mean()"),
    ("masked_sum: keeps NaN", "sfd_sd/losses.py", "keep = torch.isfinite(per_sample.detach())", "keep = torch.ones_like(per_sample, dtype=torch.bool)"),
    ("clean: NaN left", "sfd_sd/losses.py", "nan=0.0, posinf", "nan=float('nan'), posinf"),
    # terms.py
    ("terms: teacher at c_f in forget", "sfd_sd/terms.py", "teacher=override,", "teacher=forget,"),
    ("terms: fake always at c_o", "sfd_sd/terms.py", "fake_cond = override if g.sg_w_override else forget", "fake_cond = override"),
    ("terms: kappa1 for fake eval", "sfd_sd/terms.py", "fake_guidance=g.kappa_fake_eval, teacher=cond", "fake_guidance=g.kappa_fake_train, teacher=cond"),
    ("terms: teacher negative ignored", "sfd_sd/terms.py", "teacher=override,\n                       teacher_negative=_maybe(batch.negative, g.neg_teacher)", "teacher=override,\n                       teacher_negative=None"),
    ("terms: dropout not applied to generator", "sfd_sd/terms.py", "generator=_drop(forget, dropped)", "generator=forget"),
    ("terms: dropout trigger counts kappa4", "sfd_sd/terms.py", "(self.kappa_fake_train != 1.0 or self.kappa_fake_eval != 1.0)", "(self.kappa_fake_train != 1.0 or self.kappa_fake_eval != 1.0 or self.kappa_teacher != 1.0)"),
    # denoiser.py
    ("denoiser: cfg sign", "sfd_sd/denoiser.py", "eps_u + guidance * (eps_c - eps_u)", "eps_c + guidance * (eps_c - eps_u)"),
    ("denoiser: chunk order", "sfd_sd/denoiser.py", "eps_u, eps_c = self._raw", "eps_c, eps_u = self._raw"),
    ("denoiser: negative ignored", "sfd_sd/denoiser.py", "uncond = list(negative) if negative is not None else", "uncond = None if negative is not None else"),
    ("denoiser: x0 with a", "sfd_sd/denoiser.py", "(x_t.float() - self.schedule.b(t, x_t) * eps) / self.schedule.a(t, x_t)", "(x_t.float() - self.schedule.a(t, x_t) * eps) / self.schedule.a(t, x_t)"),
    ("denoiser: x_init = z", "sfd_sd/denoiser.py", "x_init = generator.schedule.b(t, z) * z", "x_init = z"),
    ("denoiser: b = 1 - abar", "sfd_sd/denoiser.py", "self.b_table = (1 - abar).sqrt().float()", "self.b_table = (1 - abar).float()"),
    ("denoiser: add_noise swapped", "sfd_sd/denoiser.py", "self.a(t, x0) * x0 + self.b(t, x0) * eps", "self.b(t, x0) * x0 + self.a(t, x0) * eps"),
    ("denoiser: v-pred sign", "sfd_sd/denoiser.py", "self.schedule.b(t, x_t) * x_t.float() + self.schedule.a(t, x_t) * out", "self.schedule.a(t, x_t) * x_t.float() + self.schedule.b(t, x_t) * out"),
    # checkpoints.py
    ("ckpt: state written in place", "sfd_sd/checkpoints.py", "        torch.save(obj, tmp)\n        os.replace(tmp, path)", "        torch.save(obj, path)"),
    ("ckpt: bytes written in place", "sfd_sd/checkpoints.py", "    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f\".{path.name}.\", suffix=\".tmp\")\n    try:\n        with os.fdopen(fd, \"wb\") as f:\n            f.write(data)\n        os.replace(tmp, path)", "    tmp = path\n    try:\n        with open(path, \"wb\") as f:\n            f.write(data)"),
    ("ckpt: tmp not removed on failure", "sfd_sd/checkpoints.py", "    except BaseException:\n        Path(tmp).unlink(missing_ok=True)\n        raise\n\n\ndef save_generator", "    except BaseException:\n        raise\n\n\ndef save_generator"),
    ("ckpt: snapshot removed before write", "sfd_sd/checkpoints.py", "    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f\".{folder.name}.\"))\n", "    shutil.rmtree(folder, ignore_errors=True)\n    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f\".{folder.name}.\"))\n"),
    ("ckpt: latest = first", "sfd_sd/checkpoints.py", "return states[-1] if states", "return states[0] if states"),
    # training.py (the SFD step)
    ("step: t from [0, 1000)", "sfd_sd/training.py", "torch.randint(self.cfg.t_min, self.cfg.t_max,", "torch.randint(0, 1000,"),
    ("step: forget weight = remain weight", "sfd_sd/training.py", "(\"gen_forget\", cfg.w_gen_forget)", "(\"gen_forget\", cfg.w_gen_remain)"),
    ("step: phi forget weight = remain weight", "sfd_sd/training.py", "(\"fake_forget\", cfg.w_fake_forget)", "(\"fake_forget\", cfg.w_fake_remain)"),
    ("step: norm clipping", "sfd_sd/training.py", "p.grad.clamp_(-clip, clip)", "torch.nn.utils.clip_grad_norm_([p], clip)"),
    ("step: alpha forced to 1", "sfd_sd/training.py", "x_g, t, eps, alpha=cfg.alpha,", "x_g, t, eps, alpha=1.0,"),
    ("step: same eps as z", "sfd_sd/training.py", "        eps = torch.randn((n, *self.latent_shape), **kw)\n", "        eps = z\n"),
    ("step: EMA inverted", "sfd_sd/training.py", "p_ema.copy_(p.detach().lerp(p_ema, beta))", "p_ema.copy_(p_ema.lerp(p.detach(), beta))"),
    ("step: generator step sees old fake", "sfd_sd/training.py", "        losses = self.fake_step(cur_nimg)\n        gen = self.generator_step(cur_nimg)", "        gen = self.generator_step(cur_nimg)\n        losses = self.fake_step(cur_nimg)"),
    # faults (issue 11 items 2-4)
    ("nonfinite: all-NaN term passes", "sfd_sd/training.py", "if kept == 0 or not math.isfinite(value):", "if False:"),
    ("nonfinite: NaN weights accepted", "sfd_sd/checkpoints.py", "value.is_floating_point() and not torch.isfinite(value).all()", "value.is_floating_point() and False"),
    ("run: no lock", "sfd_sd/checkpoints.py", "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass"),
    ("run: leftovers kept", "sfd_sd/checkpoints.py", "            p.unlink(missing_ok=True)\n        elif", "            pass\n        elif"),
    ("run: log not truncated", "sfd_sd/training.py", "if len(keep) != len(lines):", "if False:"),
    ("resume: changed settings accepted", "sfd_sd/training.py", "if changed and not cfg.allow_changed_settings:", "if False:"),
    ("resume: state not checked", "sfd_sd/checkpoints.py", "        state = torch.load(path, map_location=\"cpu\", weights_only=True)\n    except Exception", "        state = torch.load(path, map_location=\"cpu\", weights_only=True)\n    except ZeroDivisionError"),
    ("generate: provenance ignored", "sfd_sd/generation.py", "        if differ:", "        if False:"),
    ("generate: manifest not merged", "sfd_sd/generation.py", "rows = {r[\"path\"]: r for r in (previous or {}).get(\"images\", [])}", "rows = {}"),
    ("numerics: generator clip = fake clip", "sfd_sd/training.py", "cfg.fake_grad_clip_value, cfg.generator_clip_for(precision)", "cfg.fake_grad_clip_value, cfg.fake_grad_clip_value"),
    ("numerics: adam eps ignores fp16", "sfd_sd/config.py", "(1e-6 if precision == \"fp16\" else 1e-8)", "1e-8"),
    ("terms: dropped remain loses negative", "sfd_sd/terms.py", "fake_negative=_maybe(batch.negative, g.neg_fake_train),\n", "fake_negative=_maybe(_drop(batch.negative, dropped), g.neg_fake_train),\n"),
    ("config: unknown keys accepted", "sfd_sd/config.py", "        if key not in keys:\n", "        if False:\n"),
    ("config: yaml paths not relative to the file", "sfd_sd/config.py", "base=Path(path).resolve().parent)", "base=Path.cwd())"),
    ("generator_init: none accepted", "sfd_sd/training.py", "    if init is None:\n        raise ConfigError", "    if False:\n        raise ConfigError"),
    ("convert: any class allowed", "sfd_sd/sid_lsg.py", "        raise UnsafePickleError(", "        return super().find_class(module, name)\n        raise UnsafePickleError("),
    ("generate: orphan images adopted", "sfd_sd/generation.py", "    if any(out.glob(\"*/*.png\")):", "    if False:"),
    # issue 26 item 6: every numeric key has a range
    ("range: not checked", "sfd_sd/config.py", "        check_ranges(self)\n", ""),
    ("range: open lower end allowed", "sfd_sd/config.py", "(self.lo_open and value == self.lo)", "False"),
    ("range: nan and inf accepted", "sfd_sd/config.py", "        if not math.isfinite(value):", "        if False:"),
    ("range: list checked by its first element", "sfd_sd/config.py", "for v in (value if isinstance(value, list)", "for v in (value[:1] if isinstance(value, list)"),
    ("range: null skips any optional key", "sfd_sd/config.py", "if value is None and _is_optional(key):", "if _is_optional(key):"),
    ("range: lr_gen unranged", "sfd_sd/config.py", "    \"lr_gen\": POSITIVE,\n", ""),
    ("range: ema_rampup unbounded", "sfd_sd/config.py", "    \"ema_rampup\": UNIT,", "    \"ema_rampup\": NON_NEGATIVE,"),
    ("range: coverage ignores lists", "sfd_sd/config.py", "    if typing.get_origin(hint) is list:\n        hint = typing.get_args(hint)[0]\n", ""),
    # issue 21 item 10: no rank exits 75 before rank 0 is done
    ("preempt: ranks leave without waiting", "train.py", "            wait_for_every_rank()  #", "            pass  #"),
    ("preempt: barrier skipped", "sfd_sd/preemption.py", "        tdist.barrier()\n", "        pass\n"),
    # issue 26 item 5: damaged images in evaluate.py folders
    ("evaluate: damaged image passed to NudeNet", "sfd_sd/evaluation/nudity.py", "    check_readable(images.items)  #", "    pass  #"),
    ("evaluate: damaged image passed to a plug-in", "sfd_sd/evaluation/celebrity.py", "        check_readable([it for it, _ in kept])", "        pass"),
    # issue 24: LoRA mode (adapter=lora)
    ("lora: rank ignored", "sfd_sd/lora.py", "LoraConfig(r=cfg.lora_rank,", "LoraConfig(r=8,"),
    ("lora: alpha ignored", "sfd_sd/lora.py", "lora_alpha=cfg.lora_alpha,", "lora_alpha=cfg.lora_rank,"),
    ("lora: targets ignored", "sfd_sd/lora.py", "target_modules=list(cfg.lora_targets),", "target_modules=[\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"],"),
    ("lora: dropout ignored", "sfd_sd/lora.py", "lora_dropout=cfg.lora_dropout, init_lora_weights", "lora_dropout=0.0, init_lora_weights"),
    ("lora: base weights trainable", "sfd_sd/training.py", "        fake_unet.train()\n        _set_trainable(nets.params(\"fake\"), True)", "        fake_unet.train().requires_grad_(True)"),
    ("lora: fake score on a copy of the teacher", "sfd_sd/lora.py", "memo = {id(t): t for t in shared}", "memo = {}"),
    ("lora: EMA shares the generator's adapter", "sfd_sd/lora.py", "named_parameters() if \".lora_\" not in n] + list", "named_parameters()] + list"),
    ("lora: teacher carries the adapter", "sfd_sd/lora.py", "return teacher_unet, fake.eval(), gen.eval()", "return fake, fake.eval(), gen.eval()"),
    ("lora: dropout stream not restored", "sfd_sd/training.py", "            torch.random.set_rng_state(state[\"torch_rng\"])", "            pass"),
    ("lora: alpha not in the adapter file", "sfd_sd/lora.py", "unet_lora_adapter_metadata=metadata(cfg_like))", "unet_lora_adapter_metadata=None)"),
    ("evaluate: empty file not named", "sfd_sd/evaluation/folders.py", "Path(path).stat().st_size == 0:", "False:"),
]


def run_tests() -> tuple[bool, float]:
    t0 = time.time()
    tests = [a for a in FAST_TESTS if not a.endswith(".py") or (SD / a).is_file()]  # older checkouts lack some
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                         cwd=SD, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return res.returncode == 0, time.time() - t0


def stale_mutations(mutations=None) -> list[str]:
    """The mutations whose original text does not occur exactly once in their file (or whose file is gone)."""
    stale = []
    for name, rel, old, _new in MUTATIONS if mutations is None else mutations:
        path = SD / rel
        count = path.read_text().count(old) if path.is_file() else 0
        if count != 1:
            stale.append(f"{name}: {rel} (its text occurs {count} times)")
    return stale


def main(select: str = "") -> int:
    survivors = []
    chosen = [m for m in MUTATIONS if any(part in m[0] for part in select.split(","))]
    stale = stale_mutations(chosen)
    if stale:
        print(f"{len(stale)} mutation(s) no longer apply; update MUTATIONS in tests/mutation_check.py:", flush=True)
        for line in stale:
            print("  stale:", line)
        return 3
    passed, secs = run_tests()  # a mutation only counts as killed if the unmutated tree passes
    if not passed:
        print(f"the fast tests fail on the unmutated tree ({secs:.0f}s); fix that first")
        return 2
    applied = 0
    for name, rel, old, new in chosen:
        path = SD / rel
        text = path.read_text()
        applied += 1
        try:
            path.write_text(text.replace(old, new))
            passed, secs = run_tests()
        finally:
            path.write_text(text)
        print(f"{'SURVIVED' if passed else 'killed  '} {name} ({secs:.0f}s)", flush=True)
        if passed:
            survivors.append(name)
    print(f"\n{applied - len(survivors)} of {applied} applied mutations killed; survivors: {survivors}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
