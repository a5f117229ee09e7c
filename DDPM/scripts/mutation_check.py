#!/usr/bin/env python
"""Targeted mutation testing: break one line of the method at a time and check a fast test notices.

Each mutant replaces an exact piece of source text (it must occur exactly once) in a temporary copy of
the tree (the tree itself is never touched), runs the given fast tests with ``-x`` and restores the file. A mutant *survives* when every
test still passes. A mutant whose text no longer occurs exactly once is *stale*: the tool refuses to run
(exit 3) and names it, so the list is kept in step with the code instead of quietly checking less
(tests/test_mutation_lists.py runs that check in CI). Usage (from inside DDPM/):

  python scripts/mutation_check.py                         # the default fast tests
  python scripts/mutation_check.py tests/test_sfd.py tests/test_core.py   # a chosen set ("before")

(mutmut 3 would generate several hundred mutants of these files; on a 2-core machine shared with other
jobs that is hours, so this list targets the lines that carry the method, the EMA and the writers.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]

# (file, original text, mutated text, what it breaks)
MUTANTS = [
    ("sfd_ddpm/losses.py", "    x_g = x_g.detach()\n    if augment is None:", "    if augment is None:",
     "DSM loss without stop-grad on x_g"),
    ("sfd_ddpm/diffusion.py", "(eps - denoiser.eps(x_t, t, label, guidance)).square()",
     "(eps - denoiser.eps(x_t, t, label, guidance)).abs()", "DSM L1 instead of L2"),
    ("sfd_ddpm/losses.py", ".mean(1).clamp_min(1e-5).detach()", ".mean(1).clamp_min(1e-5)", "omega carries gradient"),
    ("sfd_ddpm/losses.py", ".abs().flatten(1).mean(1).clamp_min", ".abs().flatten(1).sum(1).clamp_min", "omega sum not mean"),
    ("sfd_ddpm/losses.py", ".clamp_min(1e-5)", ".clamp_min(1e-1)", "omega clamp 1e-1"),
    ("sfd_ddpm/losses.py", "- alpha * diff", "- 1.0 * diff", "alpha forced to 1"),
    ("sfd_ddpm/losses.py", "f_teacher = teacher(x_t, t, label_teacher, teacher_guidance)",
     "f_teacher = teacher(x_t, t, label_fake, teacher_guidance)", "teacher at the forget label instead of the override"),
    ("sfd_ddpm/losses.py", "f_fake = fake_score(x_t, t, label_fake, fake_guidance)",
     "f_fake = fake_score(x_t.detach(), t, label_fake, fake_guidance)", "no gradient through the fake score's input"),
    ("sfd_ddpm/methods/sfd.py", 'w_theta = [s["lambda_theta_r"]] + ([s["lambda_theta_f"]]',
     'w_theta = [s["lambda_theta_r"]] + ([s["lambda_theta_r"]]', "generator forget weight = remain weight"),
    ("sfd_ddpm/methods/sfd.py", 'w_phi = [s["lambda_phi_r"]] + ([s["lambda_phi_f"]]',
     'w_phi = [s["lambda_phi_r"]] + ([s["lambda_phi_r"]]', "fake-score forget weight = remain weight"),
    ("sfd_ddpm/methods/sfd.py", 'else (s["t_min"], s["t_max"])', "else (0, 1000)", "t drawn from [0, 1000)"),
    ("sfd_ddpm/methods/sfd.py", "torch.nn.utils.clip_grad_value_(net.parameters(), clip)",
     "torch.nn.utils.clip_grad_norm_(net.parameters(), clip)", "grad-norm clipping instead of value clipping"),
    ("sfd_ddpm/methods/sfd.py", '"t": self._t(n, warm and forget, phi)', '"t": self._t(n, warm, phi)',
     "warm-up range for remain terms"),
    ("sfd_ddpm/methods/sfd.py", "warm = step < self.warmup_iters", "warm = step <= self.warmup_iters",
     "warm-up one iteration too long"),
    ("sfd_ddpm/methods/sfd.py", '"eps": torch.randn(n, *self.shape, device=dev)}', '"eps": torch.zeros(n, *self.shape, device=dev)}',
     "no diffusion noise"),
    ("sfd_ddpm/methods/sfd.py", "means = [per[k * n:(k + 1) * n].mean()", "means = [per[k * n:(k + 1) * n].sum()",
     "batch sum instead of mean"),
    ("sfd_ddpm/methods/sfd.py", 'd["override"] if d["forget"] else d["label"] for d in terms])',
     'd["label"] for d in terms])', "teacher not at the override"),
    ("sfd_ddpm/methods/sfd.py", 'one_step(self.generator, torch.cat([d["label"] for d in terms]), z, self.t_init)',
     'one_step(self.generator, torch.cat([d["label"] for d in terms]), z, self.cfg["sfd"]["t_max"])', "generator at t_max"),
    ("sfd_ddpm/methods/sfd.py", "ema_update(self.gen_ema, unwrap(self.gen_net), ema_decay(self.cfg, step))",
     "ema_update(self.gen_ema, unwrap(self.fake_net), ema_decay(self.cfg, step))", "EMA of the fake score"),
    ("sfd_ddpm/methods/sfd.py", 'teacher_label, self._cat(terms, "label"), self.cfg["sfd"]["alpha"],',
     'teacher_label, self._cat(terms, "label"), 1.0,', "alpha forced to 1 in the method"),
    ("sfd_ddpm/methods/common.py", "[p.detach() for p in net.parameters()], 1.0 - decay)",
     "[p.detach() for p in net.parameters()], decay)", "EMA inverted"),
    ("sfd_ddpm/methods/common.py", "min(tr[\"ema\"], (1 + step) / (10 + step))", "max(tr[\"ema\"], (1 + step) / (10 + step))",
     "EMA ramp-up max instead of min"),
    ("sfd_ddpm/methods/forget_spec.py", "return self._pick(self.remain, n)\n\n    def sample_forget",
     "return self._pick(self.remain + self.forget, n)\n\n    def sample_forget", "remain labels include the forget class"),
    ("sfd_ddpm/methods/forget_spec.py", 'return label, self._pick(self.remain, n)', 'return label, self._pick(self.remain[:1], n)',
     "random override always the first kept class"),
    ("sfd_ddpm/methods/forget_spec.py", 'logits[:, self.forget] = float("-inf")', "pass", "pseudo-labels may be the forget class"),
    ("sfd_ddpm/methods/forget_spec.py", "lut[f] = o", "lut[f] = f", "override table maps forget to itself"),
    ("sfd_ddpm/diffusion.py", "_bc(self.b(t, x0.dtype), x0) * eps", "_bc(self.a(t, x0.dtype), x0) * eps", "forward noising with a_t"),
    ("sfd_ddpm/diffusion.py", "torch.cumprod(1.0 - betas, dim=0)", "torch.cumprod(1.0 - betas, dim=0) ** 0.5", "wrong abar"),
    ("sfd_ddpm/diffusion.py", "return (1 + guidance) * out_c - guidance * out_u", "return guidance * out_c - guidance * out_u",
     "guidance formula"),
    ("sfd_ddpm/diffusion.py", "torch.randint(lo, hi, (n,)", "torch.randint(lo, hi + 1, (n,)", "inclusive upper timestep"),
    ("sfd_ddpm/diffusion.py", "return (x_t - _bc(self.b(t, x_t.dtype), x_t) * eps) / _bc(self.a(t, x_t.dtype), x_t)",
     "return (x_t - _bc(self.b(t, x_t.dtype), x_t) * eps) / _bc(self.b(t, x_t.dtype), x_t)", "denoised estimate / b_t"),
    ("sfd_ddpm/samplers.py", "c2 = max(1 - abar_prev - c1 ** 2, 0.0) ** 0.5", "c2 = max(1 - abar_prev, 0.0) ** 0.5",
     "DDIM direction ignores eta noise"),
    ("sfd_ddpm/samplers.py", "x = x + (beta * (1 - abar_prev) / (1 - abar)) ** 0.5 * noise.randn()",
     "x = x + beta ** 0.5 * noise.randn()", "ancestral variance beta instead of beta tilde"),
    ("sfd_ddpm/samplers.py", "label * 10_000_019 + index", "label + index", "image seeds collide across classes"),
    ("sfd_ddpm/samplers.py", "torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])",
     "torch.randn((len(self.generators), *self.shape), generator=self.generators[0])", "one shared noise stream"),
    ("sfd_ddpm/diffusion.py", "pure noise at level t is ``noise_scale(t) * z``.\"\"\"\n        return self.b(t, dtype)",
     "pure noise at level t is ``noise_scale(t) * z``.\"\"\"\n        return self.a(t, dtype)", "one-step input a_t z"),
    ("sfd_ddpm/samplers.py", "return n * (2 if guidance else 1)", "return n", "NFE ignores guidance"),
    ("sfd_ddpm/checkpoints.py", "        write(tmp)\n", "        write(str(path))\n", "non-atomic write"),
    ("sfd_ddpm/checkpoints.py", "            os.remove(tmp)", "            pass", "temporary file left behind"),
    ("sfd_ddpm/checkpoints.py", '"step": str(step)', '"step": "0"', "step not recorded"),
    ("sfd_ddpm/checkpoints.py", "map_location=\"cpu\", weights_only=True)", "map_location=\"cpu\", weights_only=False)",
     "training state loads pickles"),
    ("sfd_ddpm/checkpoints.py", "module.load_state_dict(state, strict=True)", "module.load_state_dict(state, strict=False)",
     "non-strict load"),
    # settings and resume (tests/test_settings.py)
    ("sfd_ddpm/config.py", "    _check_range(path, value)\n", "", "no range check (training.ema=1.5 runs)"),
    ("sfd_ddpm/config.py", "        if not rng.holds(x):", "        if False:", "range check never refuses"),
    ("sfd_ddpm/config.py", "(x > self.low if self.low_open else x >= self.low)", "x >= self.low",
     "open lower ends (lr > 0) taken as closed"),
    ("sfd_ddpm/config.py", "    check_order(cfg)\n    return cfg", "    return cfg", "swapped t range accepted"),
    ("sfd_ddpm/config.py", "    if other and not allowed:", "    if False:", "resume takes changed settings silently"),
    ("sfd_ddpm/config.py", "    if fixed:\n", "    if fixed and not allowed:\n",
     "--allow-changed-settings changes the network on resume"),
    ("sfd_ddpm/training.py", '        cfg = {**cfg, "changes": record}', "        pass", "accepted change not recorded"),
    ("sfd_ddpm/training.py", "        if n_iters < start:", "        if False:", "resume below the saved iteration"),
    ("sfd_ddpm/training.py", "        if bad is not None:  # a resume would only continue from NaN",
     "        if False:", "resume from a non-finite state"),
    ("sfd_ddpm/rotation.py", "non_finite_tensor(load_state(path)[\"method\"]) is None", "True",
     "newest state named as the last finite one"),
    ("sfd_ddpm/training.py", "    state = method.state_dict()\n    _refuse_non_finite(state, run_dir, done)",
     "    state = method.state_dict()", "a non-finite state is saved and rotates the finite one away"),
    ("sfd_ddpm/training.py", "    weights = method.weights()\n    _refuse_non_finite(weights, run_dir, done)",
     "    weights = method.weights()", "a non-finite snapshot is saved"),
    # float64 stays float64 (tests/test_float64.py)
    ("sfd_ddpm/diffusion.py", "        return values.to(t.device)[t.long()].to(dtype)", "        return values.to(t.device)[t.long()].float()",
     "schedule coefficients cast to float32"),
    ("sfd_ddpm/diffusion.py", "dtype = x.dtype if isinstance(t, float) else torch.long",
     "dtype = torch.float32 if isinstance(t, float) else torch.long", "EDM sampler's sigma cast to float32"),
    # SiD's augmentation of the fake score's images (tests/test_augment.py)
    ("sfd_ddpm/losses.py", "return fake_score.loss(x_a, label, t, eps, guidance, augment_labels)",
     "return fake_score.loss(x_a, label, t, eps, guidance)", "augmentation labels not given to the fake score"),
    ("sfd_ddpm/losses.py", "return fake_score.loss(x_a, label, t, eps, guidance, augment_labels)",
     "return fake_score.loss(x_g, label, t, eps, guidance, augment_labels)", "fake score learns un-augmented images"),
    ("sfd_ddpm/methods/sfd.py", 'self.guidance.fake_train, self.augment)', 'self.guidance.fake_train)',
     "sfd.augment ignored"),
    ("sfd_ddpm/augment.py", "yflip = _gate(torch.randint(2, (n,), device=dev).float(), r[\"yflip\"])",
     "yflip = torch.randint(2, (n,), device=dev).float()", "y-flip regardless of p"),
    ("sfd_ddpm/augment.py", "axis = _gate((torch.rand(n, device=dev) * 2 - 1) * math.pi, ANISO_ROTATE_PROB)",
     "axis = (torch.rand(n, device=dev) * 2 - 1) * math.pi", "anisotropy axis always turned"),
    ("sfd_ddpm/networks_edm.py", "self.class_vector(label), augment_labels)", "self.class_vector(label))",
     "network ignores its augmentation labels"),
    ("sfd_ddpm/augment.py", "_rotation(angle) @ _rotation(-axis)", "_rotation(-angle) @ _rotation(-axis)",
     "rotation against its label"),
    ("sfd_ddpm/methods/sfd.py", 'for _ in range(s["fake_updates"]):', "for _ in range(1):", "sfd.fake_updates ignored"),
    ("sfd_ddpm/edm.py", 'return self.sample_train(count, "cpu", generator), 1.0 / count',
     'return torch.full((count,), self.sigma_data), 1.0 / count', "EDM Fisher at one fixed sigma"),
    ("sfd_ddpm/edm.py", 'return self.sample_train(count, "cpu", generator), 1.0 / count',
     'return self.sample_train(count, "cpu", generator), 1.0', "EDM Fisher summed instead of averaged"),
    ("sfd_ddpm/diffusion.py", "return t, T / len(t)", "return t, 1.0", "DDPM Fisher subset not scaled to all T"),
    ("sfd_ddpm/edm.py", "return z * level", "return z", "EDM partial sampling starts at unit noise"),
    ("sfd_ddpm/methods/esd.py", "    x = sched.start_noise(x, seq[-1])\n", "", "ESD ignores the backbone's start noise"),
    # the demo on a folder: classes by name, a teacher sized to it and judged before the table
    # (tests/test_demo.py, tests/test_compare.py, tests/test_teacher_budget.py)
    ("demo.py", 'forget = resolve_class("index:0" if forget is None else forget', 'forget = resolve_class("index:0"',
     "demo --forget ignored"),
    ("sfd_ddpm/demo_report.py", '"weak": fa < TEACHER_MIN_FORGET or ra < TEACHER_MIN_REMAINING',
     '"weak": fa < TEACHER_MIN_FORGET', "a teacher weak on the remaining classes passes"),
    ("sfd_ddpm/teacher_budget.py", '"time" if (now - t0) + (now - t_chunk) > minutes * 60',
     '"time" if (now - t0) > minutes * 60', "the teacher budget ignores the next chunk"),
    ("sfd_ddpm/teacher_budget.py", 'measured["accuracy"] >= rule["stop_accuracy"]', 'measured["accuracy"] > 1.0',
     "the teacher never stops early"),
]

DEFAULT_TESTS = ["tests/test_sfd.py", "tests/test_core.py", "tests/test_reference_sfd.py", "tests/test_determinism.py",
                 "tests/test_faults.py", "tests/test_settings.py", "tests/test_float64.py", "tests/test_augment.py",
                 "tests/test_guidance.py", "tests/test_levels.py", "tests/test_teacher_budget.py", "tests/test_demo.py",
                 "tests/test_compare.py"]
FAST = "not subprocess and not slow"   # no entry scripts in subprocesses


def run_tests(tree: Path, tests: list[str]) -> bool:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-m", FAST, *tests],
                          cwd=tree, env=env, capture_output=True, text=True)
    return proc.returncode == 0


def main(argv: list[str]) -> int:
    only = None
    if argv[:1] == ["--only"]:  # --only 3,7: run just these mutants (numbered as printed)
        only, argv = {int(k) for k in argv[1].split(",")}, argv[2:]
    tests = [t for t in (argv or DEFAULT_TESTS) if (TREE / t).exists()]
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tree = Path(tmp) / "DDPM"
        shutil.copytree(TREE, tree, ignore=shutil.ignore_patterns("runs", "data", "__pycache__", "*.pyc"))
        return check(tree, tests, only)


def stale_mutants(tree: Path, mutants=None) -> list[str]:
    """The mutants whose original text does not occur exactly once in their file (or whose file is gone)."""
    stale = []
    for k, (rel, old, _new, what) in enumerate(MUTANTS if mutants is None else mutants, 1):
        path = tree / rel
        count = path.read_text().count(old) if path.is_file() else 0
        if count != 1:
            stale.append(f"[{k}] {rel}: {what} (its text occurs {count} times)")
    return stale


def check(tree: Path, tests: list[str], only=None) -> int:
    stale = stale_mutants(tree)
    if stale:
        print(f"{len(stale)} mutant(s) no longer apply; update MUTANTS in scripts/mutation_check.py:", flush=True)
        for line in stale:
            print("  stale:", line)
        return 3
    print(f"tests: {' '.join(tests)} (-m '{FAST}')", flush=True)
    if not run_tests(tree, tests):
        print("the unmutated tree fails these tests; fix that first")
        return 2
    survivors = []
    start = time.perf_counter()
    mutants = [(k, m) for k, m in enumerate(MUTANTS, 1) if only is None or k in only]
    for k, (rel, old, new, what) in mutants:
        path = tree / rel
        source = path.read_text()
        path.write_text(source.replace(old, new))
        try:
            killed = not run_tests(tree, tests)
        finally:
            path.write_text(source)
        print(f"[{k:2d}] {'killed  ' if killed else 'SURVIVED'} {rel}: {what}", flush=True)
        if not killed:
            survivors.append(f"{rel}: {what}")
    print(f"\n{len(mutants) - len(survivors)}/{len(mutants)} killed, {len(survivors)} survived "
          f"({time.perf_counter() - start:.0f} s)")
    for s in survivors:
        print("  survived:", s)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
