"""The READMEs' commands are accepted by their scripts, and `-h` works on every entry script.

The READMEs (the repository's and this tree's) are parsed, not trusted. Every `python X.py ...` or
`torchrun ... X.py ...` command, in shell blocks and in inline code, has each `--option` checked
against the click command of X.py (for `evaluate.py`, against the subcommand it follows) and, for
train.py, each KEY=VALUE word (`sfd.forget=[0]`) against the config schema. An option named in prose
must be an option of some entry script. In process: the scripts are imported, nothing runs.
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

from conftest import TREE

ROOT = TREE.parent
READMES = (ROOT / "README.md", TREE / "README.md")
# Click entry scripts (scripts/mutation_check.py is a developer tool with its own argument handling).
ENTRY_SCRIPTS = (sorted(TREE.glob("*.py")) + sorted((TREE / "benchmarks").glob("*.py"))
                 + [TREE / "scripts" / "aggregate.py"])
LAUNCHER = re.compile(r"^(\S*/)?(python3?|torchrun|bash)$")
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


def is_config_key(key: str) -> bool:
    from sfd_ddpm.config import SCHEMA, _is_leaf

    node = SCHEMA
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return _is_leaf(node)


def resolve_script(name: str, readme: Path) -> Path | None:
    """An entry script of this tree named as the README would be run (from its folder or the root)."""
    for base in (readme.parent, TREE, ROOT):
        path = (base / name).resolve()
        if path.is_file():
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


def check_call(script: Path | None, args: list[str], prose: bool = False) -> list[str]:
    """Problems with one command: options the script (or its current subcommand) does not take."""
    cmd = all_subcommand_options(script and command(script)) if prose else command(script)
    current, problems = cmd, []
    for tok in args:
        tok = tok.strip("[]()")
        if isinstance(cmd, click.Group) and tok in cmd.commands:
            current = cmd.commands[tok]
        elif re.match(r"^--?[A-Za-z][\w-]*", tok):
            opt = tok.split("=", 1)[0]
            if opt not in option_names(current):
                problems.append(f"{cmd.name if script is None else script.name} "
                                f"{'' if current is cmd else current.name + ' '}has no option {opt}")
        elif script is not None and script.name == "train.py" and re.match(r"^[a-z_][\w.]*=", tok):
            if not is_config_key(tok.split("=", 1)[0]):
                problems.append(f"train.py has no config key {tok.split('=', 1)[0]!r}")
    return problems


def prose_options(readme: Path):
    """(span, script, arguments) for inline code that names an entry script (`sample.py --seed 1`), and
    (span, None, option) for inline code that starts with an option: this README's prose names options
    of several scripts in one section, so such an option must be one of some entry script."""
    for span in re.findall(r"`([^`]+)`", FENCE.sub("", readme.read_text())):
        if span.startswith("-"):
            yield span, None, words(span)[:1]
        for name in re.findall(SCRIPT, span):
            script = resolve_script(name, readme)
            if script is not None:
                yield span, script, words(span.split(name, 1)[1])


def all_subcommand_options(cmd: click.Command | None) -> click.Command:
    """For prose: a group's options and every subcommand's (None: every entry script's), as one command."""
    if cmd is None:
        commands = [all_subcommand_options(command(s)) for s in ENTRY_SCRIPTS]
        return click.Command("any entry script", params=[p for c in commands for p in c.params])
    if not isinstance(cmd, click.Group):
        return cmd
    return click.Command(cmd.name, params=[p for c in [cmd, *cmd.commands.values()] for p in c.params],
                         context_settings=cmd.context_settings)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_readme_command_is_accepted(readme):
    calls = list(script_calls(readme))
    if readme.parent == TREE:  # the parser finds this tree's commands (a guard against a parser that finds none)
        assert {s.name for _, s, _ in calls} >= {"train.py", "sample.py", "evaluate.py", "demo.py", "compare.py",
                                                "convert_edm.py", "fisher.py", "save_dataset.py", "bench.py",
                                                "train_classifier.py", "aggregate.py"}
    problems = [f"{p}  <- {line}" for line, script, args in calls for p in check_call(script, args)]
    problems += [f"{p}  <- `{span}` (prose)" for span, owner, args in prose_options(readme)
                 for p in check_call(owner, args, prose=True)]
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_the_checker_catches_a_wrong_option_and_key():
    train, evaluate = TREE / "train.py", TREE / "evaluate.py"
    assert check_call(train, ["--config", "c.yaml", "sfd.forget=[0]", "--dry-run"]) == []
    assert check_call(train, ["--precision", "bf16"]) == ["train.py has no option --precision"]
    assert check_call(train, ["sfd.forgt=1"]) == ["train.py has no config key 'sfd.forgt'"]
    assert check_call(train, ["sfd=1"]) == ["train.py has no config key 'sfd'"]  # a section, not a key
    assert check_call(evaluate, ["ua", "--images", "x", "--forget", "0"]) == []
    assert check_call(evaluate, ["ua", "--ref", "x"]) == ["evaluate.py ua has no option --ref"]
    assert check_call(None, ["--sampling-seeds"], prose=True) == []  # demo.py's
    assert check_call(None, ["--precision"], prose=True) == ["any entry script has no option --precision"]


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: str(p.relative_to(TREE)))
def test_dash_h_works_on_every_entry_script(script):
    cmd = command(script)
    subcommands = [[name] for name in getattr(cmd, "commands", {})]
    for args in [[], *subcommands]:
        res = CliRunner().invoke(cmd, [*args, "-h"])
        assert res.exit_code == 0 and "Usage:" in res.output, (args, res.output)
