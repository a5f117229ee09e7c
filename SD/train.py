"""Score Forgetting Distillation on Stable Diffusion: forget a concept, keep a one-step generator.

Examples (from SD/):

  python train.py --remain-prompts prompts/remain_prompts_small.txt \\
      --forget-prompts prompts/brad_pitt_prompts.txt \\
      --concept-to-forget "brad pitt" --concept-to-override "a middle aged man" --dry-run

  torchrun --standalone --nproc_per_node 4 train.py ...   (see recipes/)
"""
from __future__ import annotations

import json
import sys

import click

from sfd_sd.cli import GroupedCommand, option
from sfd_sd.checkpoints import CheckpointError
from sfd_sd.config import ConfigError, TrainConfig
from sfd_sd.models import DEFAULT_SD_MODEL, ModelLoadError
from sfd_sd.prompts import PromptError

F0 = click.FloatRange(min=0)
FPOS = click.FloatRange(min=0, min_open=True)
FILE = click.Path(exists=True, dir_okay=False)


@click.command(cls=GroupedCommand, context_settings={"show_default": True, "max_content_width": 110})
# Model
@option("--sd-model", group="Model", default=DEFAULT_SD_MODEL, metavar="ID|DIR",
        help="Teacher: hub id or local folder in diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
@option("--revision", group="Model", default=None, metavar="REV", help="Hub revision (branch, tag or commit) of --sd-model.")
@option("--init-generator", group="Model", default="teacher", metavar="teacher|DIR|PKL",
        help="Generator start: 'teacher' (copy of the teacher UNet), a diffusers UNet folder, or a SiD-LSG .pkl (needs --allow-pickle).")
@option("--allow-pickle", group="Model", is_flag=True, default=False,
        help="Allow --init-generator to unpickle a file. Unpickling runs code stored in the file: only for trusted files.")
@option("--resolution", group="Model", type=click.IntRange(min=8), default=512, metavar="PX", help="Image resolution (latents are PX/8).")
# Prompts
@option("--remain-prompts", group="Prompts", type=FILE, required=True, metavar="TXT",
        help="Remain prompts, one per line (the authors used LAION-Aesthetics 6+ captions).")
@option("--forget-prompts", group="Prompts", type=FILE, default=None, metavar="TXT",
        help="Forget prompts, one per line. Without it the forget prompt is --concept-to-forget itself.")
@option("--concept-to-forget", group="Prompts", default=None, metavar="TEXT",
        help="Concept replaced (case-insensitive, literal) in each forget prompt; may be '' (nudity recipe).")
@option("--concept-to-override", group="Prompts", default=None, metavar="TEXT",
        help="Replacement text giving the override prompt c_o; '' with an empty concept keeps the prompt.")
@option("--override-prompts", group="Prompts", type=FILE, default=None, metavar="TXT",
        help="Override prompts file, paired with the forget prompts as a Cartesian product (instead of substitution).")
@option("--keywords", group="Prompts", type=FILE, default=None, metavar="TXT",
        help="Positive keywords: one is added before or after (50/50) each forget prompt.")
@option("--negative-prompts", group="Prompts", type=FILE, default=None, metavar="TXT",
        help="Negative prompts: replace '' as the unconditional CFG branch where the --neg-in-* switches say so.")
@option("--val-prompts", group="Prompts", type=FILE, default=None, metavar="TXT", help="Validation prompts (grids only).")
@option("--neg-in-fake-train/--no-neg-in-fake-train", group="Prompts", default=False,
        help="Use the negative prompt in fake-score training (use_neg[0], kappa1).")
@option("--neg-in-fake-eval/--no-neg-in-fake-eval", group="Prompts", default=False,
        help="Use the negative prompt when evaluating the fake score in the generator loss (use_neg[1], kappa2).")
@option("--neg-in-teacher/--no-neg-in-teacher", group="Prompts", default=True,
        help="Use the negative prompt when evaluating the teacher (use_neg[2], kappa4).")
@option("--sid-w-neg/--no-sid-w-neg", group="Prompts", default=False, help="Also pair remain prompts with random negative prompts.")
@option("--sg-w-override/--no-sg-w-override", group="Prompts", default=False,
        help="Condition the fake score on the override prompt for forget samples (train and eval).")
# Hyperparameters
@option("--alpha", group="Hyperparameters", type=F0, default=1.0, help="SiD alpha.")
@option("--t-min", group="Hyperparameters", type=click.IntRange(0, 999), default=20, help="Lowest training timestep (inclusive).")
@option("--t-max", group="Hyperparameters", type=click.IntRange(1, 1000), default=980, help="Highest training timestep (exclusive).")
@option("--t-init", group="Hyperparameters", type=click.IntRange(1, 999), default=625, help="Generator timestep t* (sigma ~ 2.5).")
@option("--kappa-fake-train", "--kappa1", group="Hyperparameters", type=FPOS, default=4.5, help="CFG scale in fake-score training.")
@option("--kappa-fake-eval", "--kappa2", group="Hyperparameters", type=FPOS, default=4.5, help="CFG scale of the fake score in the generator loss.")
@option("--kappa-teacher", "--kappa4", group="Hyperparameters", type=FPOS, default=4.5, help="CFG scale of the teacher in the generator loss.")
@option("--prompt-dropout", group="Hyperparameters", type=click.FloatRange(0, 1), default=0.1,
        help="Share of fake-score training prompts replaced by '' (only when a CFG scale differs from 1).")
@option("--w-fake-remain", group="Hyperparameters", type=F0, default=1.0, help="Weight of the phi remain term.")
@option("--w-fake-forget", group="Hyperparameters", type=F0, default=1.0, help="Weight of the phi forget term.")
@option("--w-gen-remain", group="Hyperparameters", type=F0, default=1.0, help="Weight of the theta remain term.")
@option("--w-gen-forget", group="Hyperparameters", type=F0, default=1.0, help="Weight of the theta forget term.")
@option("--lr-fake", group="Hyperparameters", type=FPOS, default=3e-6, help="Adam learning rate of the fake score.")
@option("--lr-gen", group="Hyperparameters", type=FPOS, default=1e-6, help="Adam learning rate of the generator.")
@option("--adam-beta1", group="Hyperparameters", type=click.FloatRange(0, 1, max_open=True), default=0.0, help="Adam beta1.")
@option("--adam-beta2", group="Hyperparameters", type=click.FloatRange(0, 1, max_open=True), default=0.999, help="Adam beta2.")
@option("--adam-eps", group="Hyperparameters", type=FPOS, default=1e-8, help="Adam epsilon.")
@option("--grad-clip", group="Hyperparameters", type=F0, default=0.0, help="Element-wise gradient value clip (0 = off, as the authors' SD runs).")
@option("--batch", group="Hyperparameters", type=click.IntRange(min=1), default=8, metavar="N", help="Global batch (all processes).")
@option("--batch-gpu", group="Hyperparameters", type=click.IntRange(min=1), default=None, metavar="N",
        help="Micro-batch per process; the rest is gradient accumulation. Default: batch / processes.")
@option("--ema", "ema_halflife_kimg", group="Hyperparameters", type=F0, default=0.0, metavar="KIMG",
        help="Generator EMA half-life in kimg (0 = no EMA; snapshots are then the raw generator).")
@option("--ema-rampup", group="Hyperparameters", type=F0, default=0.05, help="EMA ramp-up ratio (half-life <= ratio x images seen; 0 = off).")
# Schedule
@option("--duration", "duration_kimg", group="Schedule", type=FPOS, default=100.0, metavar="KIMG", help="Training length in thousands of images seen.")
@option("--tick", "tick_kimg", group="Schedule", type=FPOS, default=0.4, metavar="KIMG", help="Log interval (log.jsonl).")
@option("--snap", "snap_kimg", group="Schedule", type=FPOS, default=5.0, metavar="KIMG", help="Generator snapshot + grid interval.")
@option("--state", "state_kimg", group="Schedule", type=FPOS, default=5.0, metavar="KIMG", help="Training-state (resume) interval.")
@option("--grid-cols", group="Schedule", type=click.IntRange(1, 16), default=4, help="Seeds per grid row.")
@option("--seed", group="Schedule", type=click.IntRange(min=0), default=0, help="Random seed.")
# Performance
@option("--precision", group="Performance", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
        help="auto = bf16 on CUDA GPUs that have it (else fp16), fp32 on CPU. bf16/fp16 autocast with fp32 master weights.")
@option("--device", group="Performance", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", help="Compute device.")
@option("--attention", group="Performance", type=click.Choice(["sdpa", "xformers"]), default="sdpa", help="Attention kernel.")
@option("--grad-checkpointing/--no-grad-checkpointing", group="Performance", default=True,
        help="Recompute UNet block activations in backward (less memory, ~30% slower).")
@option("--text-cache", group="Performance", type=click.IntRange(min=0), default=256, help="Prompt embeddings kept in an LRU cache.")
# I/O
@option("--outdir", group="I/O", type=click.Path(file_okay=False), default="runs/sd", help="Root of numbered run dirs.")
@option("--desc", group="I/O", default=None, help="Name part of the run dir.")
@option("--run-dir", group="I/O", type=click.Path(file_okay=False), default=None, help="Use this run dir instead of a new numbered one.")
@option("--resume", group="I/O", type=click.Path(exists=True), default=None, metavar="PT|DIR",
        help="Training state file (or a run dir: its latest state) to continue from, in the same run dir.")
@option("--allow-changed-settings", group="I/O", is_flag=True, default=False,
        help="With --resume: continue although training settings differ from the state's (recorded in config.json).")
@option("--dry-run", "-n", group="I/O", is_flag=True, default=False, help="Print the resolved config and exit.")
def main(dry_run: bool, adam_beta1: float, adam_beta2: float, **kwargs) -> None:
    """Train a one-step SD generator that forgets a concept (SFD, SPEC section 3)."""
    kwargs = {k.replace("neg_in_", "neg_"): v for k, v in kwargs.items()}
    cfg = TrainConfig(**kwargs, adam_betas=(adam_beta1, adam_beta2))
    try:
        cfg.check()
        if dry_run:
            from sfd_sd.training import build_prompt_sampler

            sampler, val, _ = build_prompt_sampler(cfg)
            cfg.resolved = dict(forget_pairs=len(sampler.pairs), remain_prompts=len(sampler.remain),
                                val_prompts=len(val), example_pair=list(sampler.pairs[0]))
            click.echo(json.dumps(cfg.to_json(), indent=2))
            return
        from sfd_sd import distributed
        from sfd_sd.training import train

        try:
            train(cfg)
        finally:
            distributed.shutdown()
    except (ConfigError, PromptError, ModelLoadError, CheckpointError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
