"""Export a generator snapshot as a diffusers pipeline folder with a model card (optionally to the Hub).

  python export.py --snapshot runs/sd/00000-.../network-snapshot-000100000 --out export/sfd-brad-pitt
  python export.py --snapshot ... --out ... --eval-json metrics/sfd-celebrity.json --eval-json metrics/sfd-clip.json
  python export.py --snapshot ... --out ... --push-to-hub my-user/sfd-brad-pitt     (after `hf auth login`)

Load it with:  DiffusionPipeline.from_pretrained("export/sfd-brad-pitt", trust_remote_code=True)
A LoRA-mode snapshot gives the merged pipeline and, in forget_adapter/, the adapter alone (load_lora_weights).
"""
from __future__ import annotations

import sys

import click

from sfd_sd.cli import GroupedCommand, option

FILE = click.Path(exists=True, dir_okay=False)


@click.command(cls=GroupedCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                                      "max_content_width": 110})
@option("--snapshot", group="Input", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
        help="Generator snapshot folder (network-snapshot-*) written by train.py.")
@option("--generator-base", group="Input", default=None, metavar="DIR|teacher",
        help="For a LoRA-mode snapshot: the generator start it was trained on. Default: the one the snapshot records.")
@option("--sd-model", group="Input", default=None, metavar="ID|DIR",
        help="Base model for tokenizer, text encoder, VAE and scheduler. Default: the snapshot's.")
@option("--revision", group="Input", default=None, metavar="REV", help="Hub revision of --sd-model.")
@option("--eval-json", "eval_jsons", group="Input", type=FILE, multiple=True, metavar="JSON",
        help="evaluate.py record(s) to put in the model card's evaluation table (repeatable).")
@option("--out", group="Output", required=True, type=click.Path(file_okay=False), metavar="DIR",
        help="New (or empty) folder for the pipeline.")
@option("--base-model-id", group="Output", default=None, metavar="ID",
        help="Hub id of the base model for the card, when --sd-model is a local folder.")
@option("--license", "license_id", group="Output", default=None, metavar="ID",
        help="Licence identifier for the card. Default: the known base model's (creativeml-openrail-m for SD v1.5).")
@option("--push-to-hub", "repo_id", group="Output", default=None, metavar="REPO",
        help="Also upload the folder to this Hub repository (needs `hf auth login`).")
@option("--private/--public", group="Output", default=True, help="Visibility of a repository --push-to-hub creates.")
def main(snapshot, generator_base, sd_model, revision, eval_jsons, out, base_model_id, license_id, repo_id, private):
    """Write a diffusers pipeline folder (one-step SFD generator + base model parts + model card)."""
    from sfd_sd.export import ExportError, export, push_to_hub
    from sfd_sd.models import ModelLoadError

    try:
        folder = export(snapshot, out, sd_model=sd_model, revision=revision, base_model_id=base_model_id,
                        license_id=license_id, eval_jsons=eval_jsons, repo_hint=repo_id,
                        generator_base=generator_base)
        click.echo(f"wrote {folder} (load: DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True))")
        if repo_id:
            click.echo(f"uploaded: {push_to_hub(folder, repo_id, private)}")
    except (ExportError, ModelLoadError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
