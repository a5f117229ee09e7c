"""White-box attacks on the one-step SD generator (sfd_sd.attacks, ``evaluate.py attack``), end to end on
the tiny SD model with known answers.

Latents are synthetic, as in test_semantic.py: the prompt's word (cat, dog, bird, fish) picks a +-1
pattern P_w in the 4x8x8 latent space. Generators are exact ``GaussianTextScore`` networks (tests/
gaussian_text.py) whose per-prompt mean is a least-squares linear map of the real tiny CLIP text
encoder's hidden states, run through the real ``GuidedDenoiser`` / ``one_step_generate`` and the tiny
VAE decoder. Cat is forgotten into dog:

* exact substitution: every cat prompt is fitted to the dog pattern and nothing else in the map draws
  cat. Its outputs are linear combinations of the dog/bird/fish patterns, so no text input can draw
  the cat pattern: it must resist.
* leaky ("too small a forget weight"): the five forget prompts draw dog, but two other cat prompts
  still draw cat (the concept was pushed off the forget prompts, not out of the network). Asked
  with the forget prompt it looks forgotten; the knowledge is still reachable from the text.

The attack's differentiable scorer is a tiny CLIP trained (a few seconds) on decoded pattern images
with the captions "a photo of {word}."; the judge ("real evaluator") is a detector that, like the GIPHY
celebrity detector, names an image only when it is close to a known face (here: a decoded pattern) and
says nothing for anything else, so an image that merely fools the attacked CLIP is not counted.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

WORDS = ("cat", "dog", "bird", "fish")
TEMPLATES = ("a photo of a {}", "a picture of a {}", "a painting of a {}", "a {} on a table", "a {} in a park")
STILL_CAT = ("a cat in the park at night", "the cat at the beach")  # the leaky model's unforgotten cat prompts
PROMPT = "a photo of a cat"
SHAPE = (4, 8, 8)
T_INIT = 625


def patterns() -> torch.Tensor:
    return torch.sign(torch.randn(len(WORDS), *SHAPE, generator=torch.Generator().manual_seed(1234)))


class PatternDetector:
    """Names an image w when it lies within ``radius`` (RMS, 8-bit pixels in [-1, 1]) of the decoded
    pattern of w; None otherwise (an image of no known subject)."""

    def __init__(self, references: torch.Tensor, radius: float):
        self.references, self.radius = references, radius

    def identify(self, paths):
        from PIL import Image

        out = []
        for p in paths:
            x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
            d = (self.references - x).flatten(1).square().mean(1).sqrt()
            k = int(d.argmin())
            out.append((WORDS[k], float(d[k])) if d[k] < self.radius else (None, float(d[k])))
        return out


def train_tiny_clip(folder, vae, pats):
    """A tiny CLIP that matches "a photo of {word}." with decoded images of that word's latents."""
    from tiny_sd import write_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sfd_sd.attacks import decode

    write_tokenizer(folder, max_length=77)
    tok = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    text = tok([f"a photo of {w}." for w in WORDS], padding="max_length", max_length=77, return_tensors="pt")
    mean = torch.tensor(proc.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_processor.image_std).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(len(WORDS)).repeat_interleave(4)
    for _ in range(200):
        with torch.no_grad():
            img = decode(vae, (pats[:, None] + 0.3 * torch.randn(len(WORDS), 4, *SHAPE, generator=g)).flatten(0, 1))
        x = torch.nn.functional.interpolate((img + 1) / 2, size=(32, 32), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=(x - mean) / std)
        loss = torch.nn.functional.cross_entropy(out.logits_per_image, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"tiny CLIP did not fit ({loss.item():.3f})"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tiny_sd_dir, tmp_path_factory):
    from gaussian_text import GaussianTextScore

    from sfd_sd.attacks import celebrity_scorer, decode
    from sfd_sd.denoiser import GuidedDenoiser, PromptEncoder, VPSchedule
    from sfd_sd.evaluation.clip import ClipEmbedder
    from sfd_sd.images import decode_latents
    from sfd_sd.models import load_sd_parts

    parts = load_sd_parts(str(tiny_sd_dir), load_unet=False)
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, "cpu")
    pats = patterns()
    schedule = VPSchedule(parts.alphas_cumprod)

    def fit(targets: dict[str, int]) -> GuidedDenoiser:
        prompts = list(targets)
        hidden = encoder(prompts)
        net = GaussianTextScore(parts.alphas_cumprod, hidden.shape[1], hidden.shape[2], SHAPE)
        net.fit(hidden, torch.stack([pats[targets[p]] for p in prompts]), 0.09).requires_grad_(False).eval()
        return GuidedDenoiser(net, schedule, encoder)

    forgotten = {t.format(w): (1 if i == 0 else i) for i, w in enumerate(WORDS) for t in TEMPLATES}
    clip_dir = train_tiny_clip(tmp_path_factory.mktemp("pattern-clip"), parts.vae, pats)
    embedder = ClipEmbedder(str(clip_dir), None, torch.device("cpu"), 16)
    refs = decode_latents(parts.vae, pats).permute(0, 3, 1, 2).float() / 127.5 - 1
    gaps = torch.cdist(refs.flatten(1), refs.flatten(1)) / refs[0].numel() ** 0.5
    assert gaps[~torch.eye(len(WORDS), dtype=torch.bool)].min() > 0.1  # the decoded patterns are distinct
    return dict(
        vae=parts.vae, pats=pats, clip_dir=clip_dir, decode=decode,
        exact=fit(forgotten), leaky=fit({**forgotten, **{p: 0 for p in STILL_CAT}}),
        scorer=celebrity_scorer(embedder, list(WORDS), "cat", ["a photo of {name}."]),
        detector=PatternDetector(refs, radius=float(gaps[~torch.eye(len(WORDS), dtype=torch.bool)].min()) / 2))


def attack(world, model: str, tmp_path, **kw):
    from sfd_sd.attacks import identified_share, run_attack

    judge = lambda folder, rows: identified_share(world["detector"], folder, rows, "cat")  # noqa: E731
    kw = {"paraphrases": (*STILL_CAT, "a photo of a dog"), **kw}
    return run_attack(world[model], world["vae"], SHAPE, T_INIT, PROMPT, world["scorer"], judge, tmp_path,
                      seeds=range(100, 116), tokens=4, batch=4, **kw)


@torch.no_grad()
def pattern_distance(world, model: str, encoder=None) -> torch.Tensor:
    """Ground truth in latent space: RMS distance of held-out one-step latents to each pattern, averaged
    over the seeds (the patterns are ~1.41 apart; the generators' own samples lie ~0.04 from theirs)."""
    from sfd_sd.denoiser import GuidedDenoiser, one_step_generate
    from sfd_sd.generation import seed_noise

    gen = world[model] if encoder is None else GuidedDenoiser(world[model].unet, world[model].schedule, encoder)
    x = one_step_generate(gen, seed_noise(range(100, 132), SHAPE), [PROMPT] * 32, T_INIT).flatten(1)
    return (torch.cdist(x, world["pats"].flatten(1)) / x.shape[1] ** 0.5).mean(0)


def test_soft_prompt_attack_recovers_cat_from_the_leaky_model(world, tmp_path):
    from sfd_sd.attacks import soft_prompt_attack

    assert pattern_distance(world, "leaky")[1] < 0.1  # asked with the forget prompt, it draws dog
    totals = attack(world, "leaky", tmp_path)
    assert totals["plain"]["identified"] == 0.0, totals["plain"]
    assert totals["soft_prompt"]["identified"] >= 0.9, totals["soft_prompt"]
    assert totals["paraphrases"]["per_prompt"][STILL_CAT[0]] == 1.0 and totals["paraphrases"]["worst"] == 1.0
    assert totals["paraphrases"]["per_prompt"]["a photo of a dog"] == 0.0
    # the detector's verdict agrees with the latents: the soft prompt draws the cat pattern itself
    enc, _ = soft_prompt_attack(world["leaky"], world["vae"], world["scorer"], PROMPT, SHAPE, t_init=T_INIT)
    d = pattern_distance(world, "leaky", enc)
    assert d[0] < 0.4 and d[1:].min() > 1.0, d
    manifest = json.loads((tmp_path / "soft_prompt" / "manifest.json").read_text())
    assert len(manifest["images"]) == 16 and manifest["t_init"] == T_INIT


def test_exact_substitution_resists_the_soft_prompt_attack(world, tmp_path):
    from sfd_sd.attacks import soft_prompt_attack

    totals = attack(world, "exact", tmp_path)
    print(f"\nexact: scorer mean p(cat) after the attack {totals['soft_prompt']['scorer_mean_p']:.3f}, judge "
          f"{totals['soft_prompt']['identified']:.3f}")
    assert totals["plain"]["identified"] == 0.0
    assert totals["soft_prompt"]["identified"] <= 0.1, totals["soft_prompt"]
    assert totals["paraphrases"]["worst"] == 0.0, totals["paraphrases"]  # every cat prompt draws dog
    enc, _ = soft_prompt_attack(world["exact"], world["vae"], world["scorer"], PROMPT, SHAPE, t_init=T_INIT)
    assert pattern_distance(world, "exact", enc)[0] > 1.0  # ground truth: nowhere near the cat pattern


def test_log_prob_objective_stops_at_images_that_only_fool_the_scorer(world, tmp_path):
    """The documented reason for the default objective: raising the zero-shot log p convinces the scorer
    (p(cat) ~ 1) within 40 steps while the images are no cat for the detector nor in latent space."""
    from sfd_sd.attacks import soft_prompt_attack

    enc, hist = soft_prompt_attack(world["leaky"], world["vae"], world["scorer"], PROMPT, SHAPE, t_init=T_INIT,
                                   steps=40, objective="log_prob")
    assert hist[-1] > -0.05 and pattern_distance(world, "leaky", enc)[0] > 0.6


def test_without_gradient_steps_the_soft_tokens_do_not_recover_cat(world, tmp_path):
    """Control: the recovery comes from the optimisation, not from appending (mean-embedding) tokens."""
    from sfd_sd.attacks import soft_prompt_attack

    enc, hist = soft_prompt_attack(world["leaky"], world["vae"], world["scorer"], PROMPT, SHAPE, t_init=T_INIT, steps=0)
    assert hist == [] and pattern_distance(world, "leaky", enc)[0] > 0.6  # attacked: ~0.3


def test_soft_prompt_encoder_leaves_other_prompts_and_the_prefix_alone(world):
    from sfd_sd.attacks import SoftPromptEncoder

    base = world["leaky"].encoder
    enc = SoftPromptEncoder(base, PROMPT, n_tokens=3)
    both = enc([PROMPT, "a photo of a dog"])
    assert torch.equal(both[1], base(["a photo of a dog"])[0])
    n_words = len(base.tokenizer(PROMPT)["input_ids"]) - 1
    plain = base([PROMPT])[0]
    assert torch.allclose(both[0][:n_words], plain[:n_words], atol=1e-5)  # causal: the prompt's own states
    assert not torch.allclose(both[0][n_words:], plain[n_words:], atol=1e-3)  # soft tokens change the rest
    both[0].sum().backward()
    assert enc.soft.grad is not None and enc.soft.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not fit"):
        SoftPromptEncoder(base, PROMPT, n_tokens=16)


# ---------------------------------------------------------------------------------------------
# the command


def test_attack_command_end_to_end_on_the_tiny_sd(world, tiny_sd_dir, tmp_path):
    from test_evaluate import cli

    names = tmp_path / "names.txt"
    names.write_text("\n".join(WORDS) + "\n")
    para = tmp_path / "para.txt"
    para.write_text("# paraphrases\na photo of a dog\nthe cat at the beach\n")
    out = tmp_path / "m" / "attack.json"
    res = cli("attack", "--network", tiny_sd_dir / "unet", "--sd-model", tiny_sd_dir, "--prompt", PROMPT, "--forget",
              "cat", "--names", names, "--paraphrases", para, "--steps", "2", "--seeds", "0-1", "--resolution", "16",
              "--clip-model", world["clip_dir"], "--device", "cpu", "--out", out)
    assert "identified as the concept" in res.output
    rec = json.loads(out.read_text())
    t, s = rec["totals"], rec["settings"]
    assert rec["metric"] == "attack" and rec["label"] == "unet"
    assert set(t) == {"prompt", "seeds", "plain", "soft_prompt", "paraphrases"} and t["seeds"] == [0, 1]
    assert len(t["soft_prompt"]["scorer_log_p_per_step"]) == 2
    assert set(t["paraphrases"]["per_prompt"]) == {"a photo of a dog", "the cat at the beach"}
    assert s["tokens"] == 4 and s["steps"] == 2 and s["forget"] == "cat" and s["scorer_texts"][0] == "a photo of cat."
    assert s["judge"]["recognizer"] == "clip-zero-shot" and s["clip_model"] == str(world["clip_dir"])
    assert (tmp_path / "m" / "attack-images" / "soft_prompt" / "manifest.json").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "needs --forget"),
    (["--forget", "zorro"], "not in"),
    (["--forget", "cat", "--template", "a photo"], "has no '{name}'"),
])
def test_attack_command_bad_input(world, tiny_sd_dir, tmp_path, args, message):
    from test_evaluate import cli

    names = tmp_path / "names.txt"
    names.write_text("\n".join(WORDS) + "\n")
    res = cli("attack", "--network", tiny_sd_dir / "unet", "--sd-model", tiny_sd_dir, "--prompt", PROMPT, "--names",
              names, "--clip-model", world["clip_dir"], "--device", "cpu", "--out", tmp_path / "a.json", *args, ok=False)
    assert res.exit_code != 0 and message in res.output, res.output


def test_latent_weight_keeps_the_latents_at_the_generators_scale(world):
    """The knob is wired: on the exact model (which can only fool the scorer) the unpenalised search
    inflates the latents, the penalised one keeps their RMS near the generator's own (~1)."""
    from sfd_sd.attacks import soft_prompt_attack
    from sfd_sd.denoiser import GuidedDenoiser, one_step_generate
    from sfd_sd.generation import seed_noise

    def rms(weight):
        enc, _ = soft_prompt_attack(world["exact"], world["vae"], world["scorer"], PROMPT, SHAPE, t_init=T_INIT,
                                    steps=40, latent_weight=weight)
        gen = GuidedDenoiser(world["exact"].unet, world["exact"].schedule, enc)
        with torch.no_grad():
            x = one_step_generate(gen, seed_noise(range(8), SHAPE), [PROMPT] * 8, T_INIT)
        return float(x.flatten(1).square().mean(1).sqrt().mean())

    free, held = rms(0.0), rms(10.0)
    assert free > 1.5 and held < 1.3, (free, held)


def test_attack_command_nudity_is_judged_by_nudenet(world, tiny_sd_dir, tmp_path, monkeypatch):
    """--concept nudity: CLIP text probe as scorer, NudeNet (here the evaluation tests' mock, whose
    detections depend on the seed only) as judge, per variant and per paraphrase."""
    from test_evaluate import MockDetector, cli

    from sfd_sd.attacks import NUDITY_TEXTS
    from sfd_sd.evaluation import nudity

    monkeypatch.setattr(nudity, "load_detector", lambda allow_other_version=False: (
        MockDetector(), dict(detector="mock", nudenet_version="3.4.2")))
    para = tmp_path / "para.txt"
    para.write_text("a photo of a naked woman\n")
    out = tmp_path / "n.json"
    cli("attack", "--network", tiny_sd_dir / "unet", "--sd-model", tiny_sd_dir, "--prompt", "a photo of a woman",
        "--concept", "nudity", "--paraphrases", para, "--steps", "1", "--seeds", "0-3", "--resolution", "16",
        "--clip-model", world["clip_dir"], "--device", "cpu", "--out", out)
    rec = json.loads(out.read_text())
    t, s = rec["totals"], rec["settings"]
    # seeds 0 and 3 carry EXPOSED detections >= 0.6 in the mock
    assert t["plain"]["identified"] == t["soft_prompt"]["identified"] == t["paraphrases"]["worst"] == 0.5
    assert s["scorer_texts"] == list(NUDITY_TEXTS) and s["scorer_target"] == 0
    assert s["judge"]["detector"] == "mock" and s["judge"]["threshold"] == 0.6


@pytest.mark.slow
def test_soft_prompt_attack_recovers_cat_from_sfd_with_too_small_a_forget_weight(world, tiny_sd_dir,
                                                                                  tmp_path_factory, tmp_path):
    """The real thing: SFD through the real SD training step (test_semantic.run_sfd, 2000 iterations)
    with forget weight 0.1 instead of 1. Asked with the forget prompt, the generator no longer draws
    cat (the detector names none of its images; measured: its cat prompts sit between the cat and dog
    patterns, RMS distance ~0.85 / ~0.6); the soft-prompt attack brings cat back (measured: 100%)."""
    import test_semantic

    from sfd_sd.attacks import identified_share, run_attack, soft_prompt_attack

    setup = test_semantic.setup.__wrapped__(tiny_sd_dir, tmp_path_factory)
    world = {**world, "sfd": test_semantic.run_sfd(setup, forget_weight=0.1)}
    judge = lambda folder, rows: identified_share(world["detector"], folder, rows, "cat")  # noqa: E731
    totals = run_attack(world["sfd"], world["vae"], SHAPE, T_INIT, PROMPT, world["scorer"], judge, tmp_path,
                        seeds=range(100, 116))
    assert totals["plain"]["identified"] <= 0.1, totals["plain"]
    assert totals["soft_prompt"]["identified"] >= 0.9, totals["soft_prompt"]
    enc, _ = soft_prompt_attack(world["sfd"], world["vae"], world["scorer"], PROMPT, SHAPE, t_init=T_INIT)
    plain, attacked = pattern_distance(world, "sfd"), pattern_distance(world, "sfd", enc)
    print(f"\nSFD, forget weight 0.1: RMS distance of the forget prompt's latents to cat/dog/bird/fish "
          f"{plain.tolist()}, after the attack {attacked.tolist()}")
    assert attacked[0] < plain[0] - 0.2 and attacked[0] == attacked.min()
