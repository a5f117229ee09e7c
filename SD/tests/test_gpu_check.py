"""benchmarks/gpu_check.py: the SD v1.5 config in the repository, and a tiny CPU run of the whole check."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from conftest import SD_DIR

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8)


def gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SD_DIR / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_kept_config_is_the_sd15_unet():
    from diffusers import UNet2DConditionModel

    gc = gpu_check()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**gc.read_unet_config(gc.DEFAULT_CONFIG))
        text = gc.text_encoder_for(768)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD v1.5's UNet
    assert sum(p.numel() for p in text.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower
    plan = gc.memory_plan_gib(859_520_964, 123_060_480)
    assert 27.5 < plan["static_total"] < 28.0  # GiB: the README's plan


def test_tiny_cpu_run_writes_every_setting(tmp_path):
    gc = gpu_check()
    cfg = tmp_path / "tiny_unet.json"
    cfg.write_text(json.dumps(TINY_UNET))
    out = tmp_path / "check.json"
    res = CliRunner().invoke(gc.main, ["--unet-config", str(cfg), "--resolution", "64", "--warmup", "1",
                                       "--iters", "1", "--device", "cpu", "--adapter", "full", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["batch_gpu"], r["grad_checkpointing"]) for r in runs] == [(1, True), (1, False), (2, True), (2, False)]
    for r in runs:
        assert r["iters_per_sec"] > 0 and r["losses_finite"] and r["peak_rss_gib"] > 0
        assert abs(r["images_per_sec"] - r["batch_gpu"] * r["iters_per_sec"]) < 1e-6 * r["images_per_sec"]
    assert result["precision"].startswith("bf16 autocast")
    assert result["unet_params"] == sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel(
        **TINY_UNET).parameters())


def test_build_step_wires_checkpointing_precision_and_training(tmp_path):
    gc = gpu_check()
    for ckpt in (True, False):
        step, _ = gc.build_step(TINY_UNET, 64, 2, ckpt, torch.device("cpu"), torch.bfloat16)
        nets = step.nets
        assert all(n.unet.is_gradient_checkpointing == ckpt for n in (nets.teacher, nets.fake, nets.generator))
    assert nets.teacher.unet.dtype == torch.bfloat16 and nets.fake.unet.dtype == torch.float32
    assert nets.generator.amp_dtype == torch.bfloat16 and step.micro == 2
    before = [p.detach().clone() for p in nets.generator.unet.parameters()]
    step(0)  # the real SFD iteration: both networks move
    assert any(not torch.equal(a, p) for a, p in zip(before, nets.generator.unet.parameters()))


def test_saved_tensors_count_shows_the_autocast_weight_copies():
    """fp32 weights under bf16 autocast keep a bf16 copy (2 bytes/param) for backward; bf16-stored ones do not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("saved_tensors", SD_DIR / "benchmarks" / "saved_tensors.py")
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    counts = {}
    for case in ("trainable_fp32", "frozen_fp32", "frozen_bf16"):
        torch.manual_seed(0)
        unet = st.build_unet(TINY_UNET, "cpu", case)
        x = torch.randn(1, 4, 16, 16, requires_grad=True)
        counts[case] = st.saved_bytes(unet, x, torch.tensor([500]), torch.randn(1, 77, 32), torch.bfloat16)
    copy = 2 * sum(p.numel() for p in unet.parameters())
    assert 0.75 < (counts["frozen_fp32"] - counts["frozen_bf16"]) / copy < 1.1
    assert counts["trainable_fp32"] > counts["frozen_fp32"] > counts["frozen_bf16"] > 0
    with torch.no_grad():  # nothing is kept without autograd
        assert st.saved_bytes(unet, x, torch.tensor([500]), torch.randn(1, 77, 32), torch.bfloat16) == 0


def test_lora_mode_runs_on_cpu_with_the_tiny_config(tmp_path):
    """``--adapter lora``: the LoRA mode's real step (adapters only train) with its computed plan beside it."""
    gc = gpu_check()
    cfg = tmp_path / "tiny_unet.json"
    cfg.write_text(json.dumps(TINY_UNET))
    out = tmp_path / "lora.json"
    res = CliRunner().invoke(gc.main, ["--unet-config", str(cfg), "--resolution", "64", "--warmup", "1", "--iters",
                                       "1", "--device", "cpu", "--adapter", "lora", "--lora-rank", "4",
                                       "--batch-gpu", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [(r["adapter"], r["grad_checkpointing"]) for r in result["runs"]] == [("lora", True), ("lora", False)]
    tiny_targets = sum(1 for n, _ in __import__("diffusers").UNet2DConditionModel(**TINY_UNET).named_modules()
                       if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0"))
    for r in result["runs"]:
        assert r["iters_per_sec"] > 0 and r["losses_finite"] and r["peak_rss_gib"] > 0
        assert 0 < r["adapter_parameters"] <= tiny_targets * 4 * (2 * 64)  # rank 4 x (in + out) per layer
    plans = result["memory_plan_gb"]
    assert [p["adapter"] for p in plans] == ["lora", "lora"] and plans[0]["adapter_parameters"] == \
        result["runs"][0]["adapter_parameters"]


def test_lora_build_step_trains_only_the_adapters():
    gc = gpu_check()
    step, n_unet = gc.build_step(TINY_UNET, 64, 1, True, torch.device("cpu"), torch.bfloat16, adapter="lora",
                                 lora_rank=4)
    nets = step.nets
    assert nets.teacher.unet.dtype == torch.bfloat16  # the frozen bases are stored in bf16, adapters in fp32
    assert all(p.dtype == torch.float32 and p.requires_grad for p in nets.params("gen") + nets.params("fake"))
    base = {n: p.detach().clone() for n, p in nets.generator.unet.named_parameters() if ".lora_" not in n}
    adapters = [p.detach().clone() for p in nets.params("gen")]
    step(0)
    assert all(torch.equal(base[n], p) for n, p in nets.generator.unet.named_parameters() if ".lora_" not in n)
    assert any(not torch.equal(a, p) for a, p in zip(adapters, nets.params("gen")))
    assert n_unet == sum(p.numel() for p in nets.teacher.unet.parameters())
