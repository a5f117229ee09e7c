"""requirements.txt pins only what is used: each package is imported by our code or has a stated indirect use."""
from __future__ import annotations

import re

from conftest import SD_DIR

ROOT = SD_DIR.parent
IMPORT_NAME = {"pillow": "PIL", "PyYAML": "yaml", "torch-fidelity": "torch_fidelity"}
# Pinned but not imported by our code, with the reason (checked below where it can be).
INDIRECT = {"accelerate": "diffusers' from_pretrained (low_cpu_mem_usage loading)",
            "pytest-xdist": "the -n option of `make test` (a pytest plugin)"}


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[name] = version
    return out


def our_sources() -> str:
    files = [p for tree in ("DDPM", "SD") for p in (ROOT / tree).rglob("*.py") if ".venv" not in p.parts]
    return "\n".join(p.read_text() for p in files)


def test_every_pin_is_exact_and_imported_or_explained():
    src = our_sources()
    found = pins()
    assert {"torch", "diffusers", "transformers", "safetensors"} <= found.keys()
    for name, version in found.items():
        assert re.fullmatch(r"\d+(\.\d+)*", version), f"{name}=={version} is not an exact pin"
        if name in INDIRECT:
            continue
        module = IMPORT_NAME.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {re.escape(module)}(\.|\s|$)", src, re.M), \
            f"{name} is pinned in requirements.txt but never imported: remove it or use it"
    for name in ("tensorboard", "nudenet", "xformers"):  # optional extras stay optional
        assert name not in found


def test_accelerate_is_what_diffusers_loads_with():
    from diffusers.models import modeling_utils
    from diffusers.utils import is_accelerate_available

    assert is_accelerate_available() and modeling_utils._LOW_CPU_MEM_USAGE_DEFAULT is True


def test_environment_yml_installs_requirements_txt():
    env = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*- -r requirements\.txt\s*$", env, re.M)
    assert re.search(r"^\s*- python=3\.1[1-9]\s*$", env, re.M)


def test_make_test_runs_the_suites_in_parallel_with_the_pinned_plugin():
    import xdist  # noqa: F401  (the pinned plugin is installed)

    makefile = (ROOT / "Makefile").read_text()
    assert "pytest-xdist" in pins()
    assert makefile.count("$(XDIST)") >= 2 and re.search(r"^XDIST\s*:?=.*-n ", makefile, re.M)
