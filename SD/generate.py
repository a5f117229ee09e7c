"""Generate images for prompt files x seeds from an SFD generator snapshot (one step) or from the
original Stable Diffusion model (its usual multi-step sampler), for comparison.

Output: <outdir>/<prompt slug>/<seed:05d>.png and <outdir>/manifest.json (prompt, seed, path per
image, plus model and sampler settings). Under torchrun the ranks split the batches. A folder holds
images of one network and one set of settings: adding to a folder written otherwise is refused
(``--overwrite`` starts clean); more prompts or seeds with the same settings are merged into it.

  python generate.py --network runs/sd/00000-.../network-snapshot-000100000 \\
      --prompts prompts/brad_pitt_prompts_val.txt --seeds 0-19 --outdir out/sfd
  python generate.py --network teacher --prompts prompts/brad_pitt_prompts_val.txt --seeds 0-19 --outdir out/sd15

--network also takes a folder written by export.py (its unet/ is the generator), and a LoRA-mode
snapshot or an exported forget_adapter/ folder (the adapter is added to its generator start, see
--generator-base).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from sfd_sd.cli import GroupedCommand, SeedRange, option
from sfd_sd.models import DEFAULT_SD_MODEL, ModelLoadError
from sfd_sd.prompts import PromptError


@click.command(cls=GroupedCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@option("--network", group="Model", required=True, metavar="DIR|teacher",
        help="Generator snapshot folder (network-snapshot-*), export.py folder or LoRA adapter folder (a LoRA-mode "
             "snapshot or an export's forget_adapter/), or 'teacher' for the original model's sampler.")
@option("--generator-base", group="Model", default=None, metavar="DIR|teacher",
        help="For a LoRA adapter: the generator start it was trained on (the converted SiD-LSG folder). Default: "
             "the one its sfd_generator.json records.")
@option("--sd-model", group="Model", default=None, metavar="ID|DIR",
        help=f"Base model for tokenizer, text encoder and VAE. Default: the snapshot's, else {DEFAULT_SD_MODEL}.")
@option("--revision", group="Model", default=None, metavar="REV", help="Hub revision of --sd-model.")
@option("--prompts", "prompt_files", group="Prompts", type=click.Path(exists=True, dir_okay=False), multiple=True,
        metavar="TXT", help="Prompt file(s), one prompt per line (repeatable).")
@option("--prompt", "prompt_texts", group="Prompts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@option("--seeds", group="Prompts", type=SeedRange(), default="0-19", help="Seeds per prompt, e.g. '0-19' or '0,5,9'.")
@option("--t-init", group="Sampler", type=click.IntRange(1, 999), default=None,
        help="One-step generator timestep. Default: from the snapshot's sfd_generator.json, else 625.")
@option("--steps", group="Sampler", type=click.IntRange(min=1), default=50, help="Teacher sampler steps (--network teacher).")
@option("--guidance", group="Sampler", type=click.FloatRange(min=0), default=7.5, help="Teacher CFG scale (--network teacher).")
@option("--negative-prompt", group="Sampler", default="", help="Teacher negative prompt (--network teacher).")
@option("--resolution", group="Sampler", type=click.IntRange(min=8), default=512, metavar="PX", help="Image size.")
@option("--batch", group="Performance", type=click.IntRange(min=1), default=8, help="Images per forward pass per process.")
@option("--precision", group="Performance", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
        help="auto = fp16 on CUDA, fp32 on CPU.")
@option("--device", group="Performance", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", help="Compute device.")
@option("--outdir", group="I/O", type=click.Path(), required=True, help="Output folder.")
@option("--overwrite", group="I/O", is_flag=True, default=False,
        help="Start clean: delete the images and manifest a previous generate.py run left in --outdir.")
def main(network, generator_base, sd_model, revision, prompt_files, prompt_texts, seeds, t_init, steps, guidance, negative_prompt,
         resolution, batch, precision, device, outdir, overwrite):
    """Images for prompts x seeds (one step from a snapshot, or the teacher's multi-step sampler)."""
    from sfd_sd import distributed
    from sfd_sd.generation import (OneStepSampler, OutputError, TeacherSampler, merge_manifest, prepare_outdir,
                                   prompt_dirs, work_batches, write_manifest)
    from sfd_sd.lora import generator_base_of, is_adapter_folder
    from sfd_sd.models import check_model_source, read_snapshot_info, unet_folder
    from sfd_sd.prompts import read_prompt_file

    try:
        prompts = [p for f in prompt_files for p in read_prompt_file(f, "--prompts")] + list(prompt_texts)
        if not prompts:
            raise PromptError("give --prompts FILE or --prompt TEXT")
        prompts = list(dict.fromkeys(prompts))
        dirs = prompt_dirs(prompts)
        adapter = network != "teacher" and is_adapter_folder(network)
        if network != "teacher" and not adapter:  # a VAE or run folder is refused here, before any output or model
            unet_folder(network, "--network")
        info = {} if network == "teacher" else read_snapshot_info(Path(network))
        if adapter:
            generator_base = generator_base_of(info, generator_base, "--network")
        elif generator_base is not None:
            raise click.BadParameter("only for a LoRA adapter folder", param_hint="--generator-base")
        sd_model = sd_model or info.get("sd_model") or DEFAULT_SD_MODEL
        revision = revision or info.get("revision")
        check_model_source(sd_model)  # offline with a hub id: one line now, not after the output folder
        t_init = t_init or int(info.get("t_init", 625))
        dist = distributed.init(device)
        if precision == "auto":
            precision = "fp16" if dist.device.type == "cuda" else "fp32"
        if precision == "fp16" and dist.device.type != "cuda":
            raise click.BadParameter("fp16 needs CUDA", param_hint="--precision")
        # What the images depend on; a folder holds images of one provenance only.
        provenance = dict(network="teacher" if network == "teacher" else str(Path(network).resolve()),
                          snapshot=info, sd_model=sd_model, revision=revision, resolution=resolution,
                          precision=precision)
        provenance.update(dict(steps=steps, guidance=guidance, negative_prompt=negative_prompt)
                          if network == "teacher" else dict(t_init=t_init))
        if adapter:
            provenance["generator_base"] = generator_base if generator_base == "teacher" else \
                str(Path(generator_base).resolve())
        out = Path(outdir)
        previous = prepare_outdir(out, dirs, provenance, overwrite) if dist.is_main else None
        dist.barrier()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        if network == "teacher":
            sampler = TeacherSampler(sd_model, revision, steps, guidance, negative_prompt, resolution, dist.device, dtype)
        else:
            sampler = OneStepSampler(network, sd_model, revision, t_init, resolution, dist.device,
                                     None if dtype == torch.float32 else dtype, generator_base if adapter else None)
    except (PromptError, ModelLoadError, OutputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    from sfd_sd import images as img

    new_images = [dict(prompt=prompts[pi], seed=s, path=f"{dirs[pi]}/{s:05d}.png")
                  for pi in range(len(prompts)) for s in seeds]
    manifest = merge_manifest(previous, provenance, sampler.settings, new_images) if dist.is_main else None
    if dist.is_main:  # written first (complete: false) so every image in the folder is always described
        write_manifest(out, manifest, complete=False)
    batches = work_batches(len(prompts), seeds, batch)
    for items in batches[dist.rank::dist.world_size]:
        batch_prompts = [prompts[pi] for pi, _ in items]
        batch_seeds = [s for _, s in items]
        pics = sampler(batch_prompts, batch_seeds)
        for (pi, s), pic in zip(items, pics):
            img.save_png(pic.numpy(), out / dirs[pi] / f"{s:05d}.png")
    dist.barrier()
    if dist.is_main:
        manifest.update(world_size=dist.world_size, batch=batch)
        write_manifest(out, manifest, complete=True)
        click.echo(f"wrote {len(new_images)} images to {out} (manifest.json lists {len(manifest['images'])})")
    distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
