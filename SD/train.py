"""Score Forgetting Distillation on Stable Diffusion: forget a concept, keep a one-step generator.

Examples (paths in a config are relative to the config file; on the command line, to the current
directory):

  python SD/train.py --config SD/configs/celebrity_brad_pitt.yaml --dry-run
  python SD/train.py --config SD/configs/celebrity_brad_pitt.yaml generator_init=checkpoints/sid-lsg lr_gen=1e-6
  torchrun --standalone --nproc_per_node 4 SD/train.py --config SD/configs/nudity.yaml   (see SD/recipes/)
  python SD/train.py --resume runs/sd/00000-sfd-brad-pitt-gpus4-batch8-bf16 duration_kimg=120
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sfd_sd import config as C  # noqa: E402
from sfd_sd.checkpoints import CheckpointError  # noqa: E402
from sfd_sd.models import ModelLoadError  # noqa: E402
from sfd_sd.prompts import PromptError  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                 "max_content_width": 110})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="YAML",
              help="Config file (see configs/). Keys missing from it take the schema defaults.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--resume", type=click.Path(exists=True), metavar="RUN_DIR|PT",
              help="Continue a run (its latest training-state-*.pt, or this one) in its own run dir, with the "
                   "settings stored in the state; --config and KEY=VALUE still apply on top.")
@click.option("--allow-changed-settings", is_flag=True,
              help="With --resume: continue although training settings differ from the state's (recorded in "
                   "config.json).")
@click.option("--dry-run", "-n", is_flag=True, help="Print the resolved config and exit without loading any model.")
@click.option("--list-keys", is_flag=True, help="List every config key with its default and meaning, then exit.")
def main(config_path, overrides, resume, allow_changed_settings, dry_run, list_keys):
    """Train a one-step SD generator that forgets a concept (SFD, docs/method.md section 3).

    KEY=VALUE pairs override config keys (values are YAML: numbers, true/false, null, lists), e.g.
    `lr_gen=1e-6 kappa_teacher=3`. Unknown keys are errors. The run dir gets config.json, log.jsonl,
    network-snapshot-*/ (diffusers UNet folders), training-state-*.pt (exact --resume) and grids.
    """
    if list_keys:
        click.echo("\n".join(C.describe()))
        return
    try:
        cfg = resolve(config_path, overrides, resume, allow_changed_settings)
        cfg.check()
        if dry_run:
            from sfd_sd.training import build_prompt_sampler, generator_init_status

            cfg.resolved = dict(generator_init=generator_init_status(cfg))
            try:  # a dry run reports missing inputs instead of stopping at the first
                sampler, val, _ = build_prompt_sampler(cfg)
                cfg.resolved.update(prompts="ok", forget_pairs=len(sampler.pairs), remain_prompts=len(sampler.remain),
                                    val_prompts=len(val), example_pair=list(sampler.pairs[0]))
            except PromptError as exc:
                cfg.resolved.update(prompts=f"NOT READ: {exc}")
            from sfd_sd.memory import plan_for_config

            cfg.resolved["memory_plan"] = plan_for_config(cfg)  # computed for SD v1.5, nothing loaded
            click.echo(json.dumps(cfg.to_json(), indent=2))
            return
        from sfd_sd import distributed
        from sfd_sd.preemption import EXIT_PREEMPTED, Preempted, wait_for_every_rank
        from sfd_sd.training import train

        try:
            train(cfg)
        except Preempted as stop:  # SIGTERM/SIGUSR1: the state is saved; the job scheduler may requeue us
            if os.environ.get("RANK", "0") == "0":  # one message, not one per process
                click.echo(f"preempted: {stop}", err=True)
            wait_for_every_rank()  # no rank leaves (and so has torchrun kill the others) before rank 0 is done
            sys.exit(EXIT_PREEMPTED)
        finally:
            distributed.shutdown()
    except (C.ConfigError, PromptError, ModelLoadError, CheckpointError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc


def resolve(config_path, overrides, resume, allow_changed_settings) -> C.TrainConfig:
    """The run's settings: a resumed run's own (from its state) or the defaults, <- --config <- overrides."""
    base = None
    if resume:
        from sfd_sd.checkpoints import latest_training_state, read_state_config

        path = Path(resume)
        state = latest_training_state(path) if path.is_dir() else path
        if state is None:
            raise C.ConfigError(f"--resume {resume!r}: no training-state-*.pt in that folder")
        base = read_state_config(state)
    elif not config_path and not overrides:
        raise click.UsageError("give --config YAML and/or KEY=VALUE overrides (or --resume RUN_DIR); "
                               "--list-keys lists the keys")
    cfg = C.load_config(config_path, overrides, base=base)
    cfg.resume, cfg.allow_changed_settings = resume, allow_changed_settings
    return cfg


if __name__ == "__main__":
    sys.exit(main())
