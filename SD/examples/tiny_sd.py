"""Tiny Stable-Diffusion-shaped models with random weights, built offline in seconds.

    python SD/examples/tiny_sd.py --out DIR     (SD/examples/tiny.sh runs the whole pipeline on them)

writes ``DIR/sd`` (a pipeline folder: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``, the layout of a hub repository, so the code loads it through the
same ``from_pretrained`` calls it uses for ``stable-diffusion-v1-5/stable-diffusion-v1-5``),
``DIR/sid_lsg.pkl`` (a generator pickled as the SiD-LSG release is, ``{"ema": UNet}``, for
``convert_sid_lsg.py``) and ``DIR/clip`` (a CLIPModel and CLIPProcessor folder for ``evaluate.py``).
``tiny_features`` is a stand-in feature network for ``evaluate.py fid --features tiny_sd:tiny_features``.
The test suite builds its models with these same functions. Images are 16x16 (latents 4x8x8); every
number measured on these models is meaningless.

The tokenizer is a hand-made CLIP BPE vocabulary: the 256 byte-level characters (with and without
the end-of-word marker), one merge chain per listed word so that each word is a single token, and
the two special tokens. It is loaded with ``CLIPTokenizer.from_pretrained(folder)`` (passing
``vocab_file=`` to the constructor is silently ignored by transformers 5).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import click
import torch

WORDS = (
    "a photo of the picture painting cat dog bird fish man woman on table in park at night "
    "brad pitt angelina jolie middle aged portrait nudity boy girl person red carpet beach city"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (a fixed public mapping)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer(folder: Path, words=WORDS, max_length: int = 77) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merge = f"{current} {sym}"
            current = current + sym
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
    }))


def tiny_unet(seed: int = 0, sample_size: int = 8, channels=(32, 64), cross_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def build_tiny_sd(folder: Path, seed: int = 0, unet=None, max_length: int = 16) -> Path:
    """Write a tiny SD v1-style model to ``folder`` (latents 4x8x8, images 16x16).

    The text length is 16 tokens (SD uses 77): with few padding tokens a tiny cross-attention
    UNet learns text conditioning several times faster.
    """
    from diffusers import AutoencoderKL, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    write_tokenizer(folder / "tokenizer", max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder.save_pretrained(folder / "text_encoder")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(folder / "vae")
    (unet if unet is not None else tiny_unet(seed)).save_pretrained(folder / "unet")
    # SD v1.5 ships a PNDM scheduler config with these betas; we keep the same class and values.
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return folder


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny CLIPModel with its CLIPProcessor (32 px images, the hand-made tokenizer, 77 tokens)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    write_tokenizer(folder, max_length=77)
    tok = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


def sid_lsg_pickle(path: Path, seed: int = 7) -> Path:
    """A tiny one-step generator pickled the way the SiD-LSG release is ({'ema': UNet2DConditionModel})."""
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump({"ema": tiny_unet(seed=seed)}, f)
    return path


class TinyFeatures(torch.nn.Module):
    """Stand-in FID features (uint8 (N, 3, 32, 32) -> (N, 15)): 2x2 mean colours and per-channel spread."""

    input_size = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1), x.flatten(2).std(-1)], 1)


def tiny_features(device: str = "cpu") -> torch.nn.Module:
    return TinyFeatures().to(device)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder for sd/, clip/, sid_lsg.pkl.")
@click.option("--seed", default=0, help="Seed of the random weights.")
def main(out, seed):
    """Build tiny random SD, CLIP and SiD-LSG-style models (seconds, offline) for trying the pipeline."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"--out {str(out)!r} exists and is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_sd(out / "sd", seed=seed)
    build_tiny_clip(out / "clip", seed=seed)
    sid_lsg_pickle(out / "sid_lsg.pkl", seed=seed + 7)
    click.echo(f"wrote {out}/sd (sd_model=), {out}/clip (--clip-model), {out}/sid_lsg.pkl (convert_sid_lsg.py --pkl)")


if __name__ == "__main__":
    main()
