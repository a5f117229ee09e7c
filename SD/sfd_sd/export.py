"""Export a generator snapshot as a self-contained diffusers pipeline folder with a model card.

The folder holds the snapshot's UNet, the base model's tokenizer, text encoder, VAE and scheduler
configuration (so it runs offline), ``pipeline.py`` (``SFDOneStepPipeline``, named in
``model_index.json`` so ``DiffusionPipeline.from_pretrained`` finds it) and ``README.md``: a model
card with YAML front matter (licence, base model, tags) as model hubs read it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from . import models

PIPELINE_CLASS = "SFDOneStepPipeline"
PIPELINE_FILE = Path(__file__).with_name("pipeline.py")

# Licences of known base models (hub licence identifiers). Anything else needs --license.
KNOWN_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
}
# Training settings shown in the card, in this order (keys of the run's config.json).
CARD_SETTINGS = ("adapter", "lora_rank", "lora_alpha", "concept_to_forget", "concept_to_override", "forget_prompts",
                 "override_prompts", "keywords",
                 "negative_prompts", "remain_prompts", "alpha", "t_init", "t_min", "t_max", "kappa_fake_train",
                 "kappa_fake_eval", "kappa_teacher", "prompt_dropout", "w_fake_remain", "w_fake_forget",
                 "w_gen_remain", "w_gen_forget", "lr_fake", "lr_gen", "batch", "duration_kimg",
                 "ema_halflife_kimg", "resolution", "seed")


class ExportError(ValueError):
    """Bad input to the export; the message says what to do."""


def _is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path (a local base folder cannot be the card's base_model)."""
    return (bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not Path(name).expanduser().exists())


def read_run_config(snapshot: Path) -> dict:
    """The training config.json of the run the snapshot belongs to ({} when absent)."""
    path = Path(snapshot).parent / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from exc


def build_pipeline(snapshot: Path, sd_model: str, revision: str | None, t_init: int,
                   generator_base: str | None = None):
    """SFDOneStepPipeline from a snapshot UNet and the base model's other parts (fp32, CPU). With
    ``generator_base`` the snapshot is a LoRA adapter: its generator start + the adapter, merged."""
    import diffusers

    from .pipeline import SFDOneStepPipeline

    if generator_base is not None:
        from .lora import load_adapter_generator

        parts = models.load_sd_parts(sd_model, revision)
        unet = load_adapter_generator(snapshot, parts.unet, generator_base)
    else:
        parts = models.load_sd_parts(sd_model, revision, load_unet=False)
        unet = models.load_unet(snapshot, "--snapshot", parts.text_encoder, parts.vae.config.latent_channels)
    sched_cfg = dict(parts.scheduler_config)
    scheduler_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    return SFDOneStepPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
                              scheduler=scheduler_cls.from_config(sched_cfg), t_init=t_init)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "–"
    return str(value).replace("|", "\\|")


def _setting(key: str, value):
    """File settings by file name only (the run's paths mean nothing to a reader of the card)."""
    return Path(value).name if value and (key.endswith("_prompts") or key == "keywords") else value


def model_card(info: dict, run_cfg: dict, base_model: str, base_model_id: str | None, license_id: str,
               eval_table: str | None, repo_hint: str) -> str:
    """README.md with YAML front matter (hub metadata) and the human-readable card."""
    concept = run_cfg.get("concept_to_forget")
    override = run_cfg.get("concept_to_override")
    forget_what = concept if concept else Path(run_cfg.get("forget_prompts") or "unknown").stem
    meta = {
        "license": license_id,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["stable-diffusion", "text-to-image", "machine-unlearning", "score-forgetting-distillation",
                 "one-step"],
        "sfd": {"concept_forgotten": forget_what, "concept_override": override,
                "override_prompts": run_cfg.get("override_prompts"), "images_seen": info.get("images_seen"),
                "t_init": info.get("t_init")},
    }
    if base_model_id:
        meta["base_model"] = base_model_id
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    override_text = (f"`{override}`" if override else
                     f"the prompts of `{Path(run_cfg['override_prompts']).name}`" if run_cfg.get("override_prompts")
                     else "(not recorded)")
    lines = [
        "---", front.rstrip(), "---", "",
        f"# One-step SD generator with \"{forget_what}\" forgotten (SFD)", "",
        "A one-step text-to-image generator distilled from "
        f"`{base_model_id or base_model}` with Score Forgetting Distillation (Chen, Zhang, Zhou, ICLR 2025): "
        "prompts about the forgotten concept are answered as if they asked for the override, other "
        "prompts as the base model would, in a single network evaluation.", "",
        "| | |", "|---|---|",
        f"| concept forgotten | `{forget_what}` |",
        f"| override | {override_text} |",
        f"| base model | `{base_model_id or base_model}`" + (f" (revision `{info['revision']}`)" if info.get("revision")
                                                         else "") + " |",
        f"| base model licence | `{license_id}` (this model inherits it; read it before use) |",
        f"| sampler | one step at t* = {info.get('t_init')}, no classifier-free guidance |",
        f"| images seen in training | {_fmt(info.get('images_seen'))} |",
        f"| generator EMA | {_fmt(info.get('ema'))} |",
        *([f"| training mode | LoRA (rank {info.get('lora_rank')}, alpha {_fmt(info.get('lora_alpha'))}), merged into "
           "the generator start; the adapter alone is in `forget_adapter/` |"] if info.get("adapter") == "lora" else []),
        "",
        "## Use", "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f"pipe = DiffusionPipeline.from_pretrained(\"{repo_hint}\", trust_remote_code=True)",
        "image = pipe(\"a photo of a cat\", generator=torch.Generator().manual_seed(0)).images[0]",
        "image.save(\"cat.png\")",
        "```", "",
        f"`pipeline.py` in this folder defines `{PIPELINE_CLASS}` (torch and diffusers only); "
        "`trust_remote_code=True` lets diffusers import it. One `torch.Generator` per image "
        "(`generator=[torch.Generator().manual_seed(s) for s in seeds]`) gives, for each seed, the "
        "image the SFD repository's `generate.py` writes for that prompt and seed.", "",
    ]
    shown = [(k, run_cfg[k]) for k in CARD_SETTINGS if k in run_cfg
             and (not k.startswith("lora_") or run_cfg.get("adapter") == "lora")]
    if shown:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(_setting(k, v))} |" for k, v in shown]
        lines += [""]
    if eval_table:
        body = eval_table.split("\n", 1)[1] if eval_table.startswith("# ") else eval_table
        lines += ["## Evaluation", "", body.strip().replace("\n## ", "\n### "), ""]
    lines += [
        "## Limitations", "",
        "Unlearning lowers how often the concept is drawn for the prompts it was trained against; it is not "
        "a guarantee. Paraphrases, other languages or adversarial prompts may still produce it. The "
        "base model's licence and use restrictions apply unchanged.", "",
    ]
    return "\n".join(lines)


def eval_markdown(eval_jsons: Sequence[str]) -> str | None:
    if not eval_jsons:
        return None
    from .evaluation.records import EvaluationError, read_record
    from .evaluation.table import markdown_table

    try:
        return markdown_table([read_record(p) for p in eval_jsons])
    except EvaluationError as exc:
        raise ExportError(str(exc)) from exc


def check_out(out: Path) -> None:
    """Refuse an --out that cannot take the folder, before any model loads: a file, a folder with
    something in it, or a place where nothing can be written (probed in the nearest existing folder)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file: choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {str(out)!r} exists and is not empty: choose a new folder")
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".sfd-export-probe-"))
    except OSError as exc:
        where = "" if existing == out.parent else f" (in {str(existing)!r})"
        raise ExportError(f"--out {str(out)!r}: cannot write there{where}: {exc.strerror}; choose another folder") \
            from None


def export(snapshot: str | Path, out: str | Path, sd_model: str | None = None, revision: str | None = None,
           base_model_id: str | None = None, license_id: str | None = None,
           eval_jsons: Sequence[str] = (), repo_hint: str | None = None, generator_base: str | None = None) -> Path:
    """Write the pipeline folder ``out`` (atomically: a temp folder, then a rename); for a LoRA-mode
    snapshot also ``out/forget_adapter/`` (the adapter alone, for diffusers' ``load_lora_weights``)."""
    from .lora import generator_base_of, is_adapter_folder

    snapshot, out = Path(snapshot), Path(out)
    adapter = is_adapter_folder(snapshot)
    if not adapter:
        models.unet_folder(snapshot, "--snapshot")
        if generator_base is not None:
            raise ExportError("--generator-base is only for a LoRA-mode snapshot (an adapter folder)")
    check_out(out)
    info = models.read_snapshot_info(snapshot)
    if adapter:
        generator_base = generator_base_of(info, generator_base, "--snapshot")
    run_cfg = read_run_config(snapshot)
    sd_model = sd_model or info.get("sd_model") or run_cfg.get("sd_model") or models.DEFAULT_SD_MODEL
    revision = revision or info.get("revision")
    base_model_id = base_model_id or (sd_model if _is_hub_id(sd_model) else None)
    license_id = license_id or KNOWN_LICENSES.get(base_model_id or "")
    if not license_id:
        raise ExportError(f"the licence of base model {sd_model!r} is not known here: pass --license ID "
                          "(a hub licence identifier, e.g. creativeml-openrail-m) or --base-model-id HUB_ID")
    table = eval_markdown(eval_jsons)
    t_init = int(info.get("t_init", run_cfg.get("t_init", 625)))
    pipe = build_pipeline(snapshot, sd_model, revision, t_init, generator_base if adapter else None)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as exc:  # became unwritable since check_out
        raise ExportError(f"--out {str(out)!r}: cannot write there ({exc.strerror}); choose another folder") from None
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = ["pipeline", PIPELINE_CLASS]  # diffusers then imports pipeline.py from here
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(PIPELINE_FILE, tmp / "pipeline.py")
        (tmp / "sfd_generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        card = model_card(info, run_cfg, sd_model, base_model_id, license_id, table, repo_hint or str(out))
        (tmp / "README.md").write_text(card)
        if adapter:
            write_forget_adapter(snapshot, tmp / ADAPTER_DIR, info, run_cfg, sd_model, base_model_id, license_id,
                                 generator_base, repo_hint or str(out))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


ADAPTER_DIR = "forget_adapter"


def write_forget_adapter(snapshot: Path, folder: Path, info: dict, run_cfg: dict, base_model: str,
                         base_model_id: str | None, license_id: str, generator_base: str, repo_hint: str) -> None:
    """``forget_adapter/``: the LoRA file as diffusers' ``load_lora_weights`` reads it, its
    ``sfd_generator.json`` and a model card naming base model, concept, override, rank and size."""
    from .lora import LORA_WEIGHTS, adapter_info

    folder.mkdir()
    shutil.copyfile(snapshot / LORA_WEIGHTS, folder / LORA_WEIGHTS)
    (folder / "sfd_generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(adapter_card(adapter_info(folder), info, run_cfg, base_model, base_model_id,
                                                   license_id, generator_base, repo_hint))


def adapter_card(adapter: dict, info: dict, run_cfg: dict, base_model: str, base_model_id: str | None,
                 license_id: str, generator_base: str, repo_hint: str) -> str:
    concept = run_cfg.get("concept_to_forget") or Path(run_cfg.get("forget_prompts") or "unknown").stem
    override = run_cfg.get("concept_to_override")
    override_text = (f"`{override}`" if override else f"the prompts of `{Path(run_cfg['override_prompts']).name}`"
                     if run_cfg.get("override_prompts") else "(not recorded)")
    start = "the base model's own UNet (generator_init=teacher)" if generator_base == "teacher" else \
        f"`{Path(generator_base).name}` (the SiD-LSG one-step generator converted by convert_sid_lsg.py)"
    meta = {"license": license_id, "library_name": "diffusers",
            "tags": ["lora", "stable-diffusion", "text-to-image", "machine-unlearning",
                     "score-forgetting-distillation", "one-step"],
            "sfd": {"concept_forgotten": concept, "concept_override": override, "lora_rank": adapter["rank"],
                    "lora_alpha": adapter["alpha"], "lora_targets": adapter["targets"],
                    "adapter_parameters": adapter["parameters"], "adapter_bytes": adapter["bytes"],
                    "generator_start": Path(generator_base).name, "images_seen": info.get("images_seen"),
                    "t_init": info.get("t_init")}}
    if base_model_id:
        meta["base_model"] = base_model_id
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return "\n".join([
        "---", front.rstrip(), "---", "",
        f"# Forget-adapter: \"{concept}\" forgotten (SFD, LoRA)", "",
        "A LoRA adapter for the one-step generator distilled from "
        f"`{base_model_id or base_model}`, trained with Score Forgetting Distillation (Chen, Zhang, Zhou, ICLR "
        "2025) in LoRA mode: with it, prompts about the forgotten concept are answered as if they asked for the "
        "override, other prompts as the generator start would.", "",
        "| | |", "|---|---|",
        f"| concept forgotten | `{concept}` |",
        f"| override | {override_text} |",
        f"| base model | `{base_model_id or base_model}` |",
        f"| adapter on | {start} |",
        f"| rank, alpha | {adapter['rank']}, {_fmt(adapter['alpha'])} (update scaled by alpha / rank) |",
        f"| adapted modules | {', '.join(f'`{t}`' for t in adapter['targets'] or [])} |",
        f"| size | {adapter['parameters']:,} parameters, {adapter['bytes'] / 1e6:.3g} MB |",
        f"| base model licence | `{license_id}` (this adapter inherits it) |",
        f"| sampler | one step at t* = {info.get('t_init')}, no classifier-free guidance |",
        f"| images seen in training | {_fmt(info.get('images_seen'))} |", "",
        "## Use", "",
        "The adapter belongs on the generator start above, not on the base model's multi-step UNet. With a "
        "pipeline folder of that generator (the SFD repository's `export.py` layout; the merged pipeline "
        f"`{repo_hint}` already has this adapter folded in):", "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        "pipe = DiffusionPipeline.from_pretrained(\"path/to/one-step-generator-start\", trust_remote_code=True)",
        "pipe.load_lora_weights(\"path/to/forget_adapter\")",
        "image = pipe(\"a photo of a cat\", generator=torch.Generator().manual_seed(0)).images[0]",
        "```", "",
        "The SFD repository's `generate.py --network forget_adapter --generator-base DIR` does the same.", "",
        "## Limitations", "",
        "Unlearning lowers how often the concept is drawn for the prompts it was trained against; it is not "
        "a guarantee, and removing the adapter restores the concept. The base model's licence applies.", ""])


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` with huggingface_hub (needs `hf auth login` first)."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise ExportError("--push-to-hub: not logged in to the Hugging Face Hub; run `hf auth login` first")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="SFD one-step generator")
    return str(getattr(commit, "commit_url", commit))
