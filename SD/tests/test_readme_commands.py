"""The READMEs' commands are accepted by their scripts, and `-h` works on every entry script.

The READMEs (the repository's and this tree's) are parsed, not trusted. Every `python X.py ...`,
`torchrun ... X.py ...` or `bash recipes/X.sh ...` command, in shell blocks and in inline code, has
each `--option` checked against the click command of X.py (for `evaluate.py`, against the subcommand
it follows) and, for train.py and the recipes that pass their arguments on to it, each KEY=VALUE word
against the config schema. An option named in prose (`--precision auto`) belongs to the entry script
its section named last before it, or to train.py when the section names none. In process: the
scripts are imported, nothing runs.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import SD_DIR

ROOT = SD_DIR.parent
READMES = (ROOT / "README.md", SD_DIR / "README.md")
ENTRY_SCRIPTS = sorted(SD_DIR.glob("*.py")) + sorted((SD_DIR / "benchmarks").glob("*.py")) + [
    SD_DIR / "examples" / "tiny_sd.py"]
# The recipes hand their extra arguments to train.py.
RECIPES = {p.name: SD_DIR / "train.py" for p in (SD_DIR / "recipes").glob("*.sh")}
LAUNCHER = re.compile(r"^(\S*/)?(python3?|torchrun|bash)$")
# Flags of the authors' code that the README cites when it compares (not options of ours).
AUTHORS_FLAGS = {"--from_distill_ema", "--fp16", "--enable_xformers 1"}
SCRIPT = r"[\w./-]+\.(?:py|sh)\b"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@functools.cache
def command(script: Path) -> click.Command:
    spec = importlib.util.spec_from_file_location(f"readme_entry_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def option_names(cmd: click.Command) -> set[str]:
    names = set(cmd.context_settings.get("help_option_names", ["--help"]))
    for p in cmd.params:
        if isinstance(p, click.Option):
            names |= set(p.opts) | set(p.secondary_opts)
    return names


def config_keys() -> set[str]:
    from sfd_sd.config import schema_fields

    return {f.name for f in schema_fields()}


def resolve_script(name: str, readme: Path) -> Path | None:
    """An entry script of this tree named as the README would be run (from its folder or the root)."""
    for base in (readme.parent, SD_DIR, ROOT):
        path = (base / name).resolve()
        if path.is_file():
            if path.suffix == ".sh" and path.name in RECIPES and path.parent.parent == SD_DIR:
                return RECIPES[path.name]
            return path if path in ENTRY_SCRIPTS else None
    return None


def words(text: str) -> list[str]:
    text = re.sub(r"(^|\s)#.*$", "", text, flags=re.M)  # shell comments
    try:
        return shlex.split(text)
    except ValueError:  # prose-like inline code with an unbalanced quote
        return text.split()


def shell_commands(readme: Path) -> list[tuple[str, list[str]]]:
    """(line, words) of every command in the README: fenced shell blocks and inline code."""
    text = readme.read_text()
    out = []
    for lang, body in FENCE.findall(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            body = body.replace("\\\n", " ")
            out += [(line.strip(), words(part)) for line in body.splitlines()
                    for part in re.split(r"&&|;|\s\|\s", line)]
    prose = FENCE.sub("", text)
    out += [(span, words(span)) for span in re.findall(r"`([^`]+)`", prose)]
    return out


def script_calls(readme: Path):
    """(line, script, arguments) for every command that runs an entry script of this tree."""
    for line, toks in shell_commands(readme):
        for i, tok in enumerate(toks):
            if not LAUNCHER.match(tok):
                continue
            for j in range(i + 1, len(toks)):
                if toks[j].endswith((".py", ".sh")):
                    script = resolve_script(toks[j], readme)
                    if script is not None:
                        yield line, script, toks[j + 1:]
                    break
            break


def check_call(script: Path, args: list[str], prose: bool = False) -> list[str]:
    """Problems with one command: options the script (or its current subcommand) does not take."""
    cmd = all_subcommand_options(command(script)) if prose else command(script)
    current, problems = cmd, []
    for tok in args:
        tok = tok.strip("[]()")
        if isinstance(cmd, click.Group) and tok in cmd.commands:
            current = cmd.commands[tok]
        elif re.match(r"^--?[A-Za-z][\w-]*", tok):
            opt = tok.split("=", 1)[0]
            if opt not in option_names(current):
                problems.append(f"{script.name} {'' if current is cmd else current.name + ' '}has no option {opt}")
        elif script.name == "train.py" and re.match(r"^[a-z_]\w*=", tok):
            if tok.split("=", 1)[0] not in config_keys():
                problems.append(f"train.py has no config key {tok.split('=', 1)[0]!r}")
    return problems


def prose_options(readme: Path):
    """(span, script, arguments) for inline code that names an entry script (`export.py --out`) or starts
    with an option; the latter belongs to the script the section's heading names, else to the one the
    section named last, else to train.py."""
    text = FENCE.sub("", readme.read_text())
    for section in re.split(r"^(?=#+ )", text, flags=re.M):  # a section starts with its heading
        heading, _, body = section.partition("\n")
        fixed = next(filter(None, (resolve_script(n, readme) for n in re.findall(SCRIPT, heading))), None)
        owner = fixed or SD_DIR / "train.py"
        for m in re.finditer(rf"`([^`]+)`|({SCRIPT})", body):
            span = m.group(1) or ""
            if span.startswith("-") and span not in AUTHORS_FLAGS:
                yield span, owner, words(span)[:1]
            for name in re.findall(SCRIPT, span) or [m.group(2)]:
                script = resolve_script(name, readme) if name else None
                if script is not None and span:
                    yield span, script, words(span.split(name, 1)[1])
                owner = fixed or script or owner


def all_subcommand_options(cmd: click.Command) -> click.Command:
    """For prose: a group's options and every subcommand's, as one command."""
    if not isinstance(cmd, click.Group):
        return cmd
    return click.Command(cmd.name, params=[p for c in [cmd, *cmd.commands.values()] for p in c.params],
                         context_settings=cmd.context_settings)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_readme_command_is_accepted(readme):
    calls = list(script_calls(readme))
    if readme.parent == SD_DIR:  # the parser finds this tree's commands (a guard against a parser that finds none)
        assert {s.name for _, s, _ in calls} >= {"train.py", "generate.py", "export.py", "evaluate.py",
                                                "convert_sid_lsg.py", "prepare_remain_prompts.py", "gpu_check.py"}
    problems = [f"{p}  <- {line}" for line, script, args in calls for p in check_call(script, args)]
    problems += [f"{p}  <- `{span}` (prose)" for span, owner, args in prose_options(readme)
                 for p in check_call(owner, args, prose=True)]
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_the_checker_catches_a_wrong_option_and_key():
    train, evaluate = SD_DIR / "train.py", SD_DIR / "evaluate.py"
    assert check_call(train, ["--config", "c.yaml", "lr_gen=1e-6", "--dry-run"]) == []
    assert check_call(train, ["--precision", "bf16"]) == ["train.py has no option --precision"]
    assert check_call(train, ["lr_generator=1"]) == ["train.py has no config key 'lr_generator'"]
    assert check_call(evaluate, ["fid", "--images", "x", "clip-score", "--prompts", "p"]) == []
    assert check_call(evaluate, ["table", "--images", "x"]) == ["evaluate.py table has no option --images"]


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: str(p.relative_to(SD_DIR)))
def test_dash_h_works_on_every_entry_script(script):
    cmd = command(script)
    subcommands = [[name] for name in getattr(cmd, "commands", {})]
    for args in [[], *subcommands]:
        res = CliRunner().invoke(cmd, [*args, "-h"])
        assert res.exit_code == 0 and "Usage:" in res.output, (args, res.output)
