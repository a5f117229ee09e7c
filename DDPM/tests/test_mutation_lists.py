"""The mutation list stays in step with the code: a mutant whose text is gone is a failure, not a skip."""
import importlib.util

from conftest import TREE


def _tool():
    spec = importlib.util.spec_from_file_location("mutation_check", TREE / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_listed_mutant_applies_to_the_current_code():
    assert _tool().stale_mutants(TREE) == []


def test_a_stale_mutant_stops_the_tool_before_any_test_runs(monkeypatch, capsys):
    tool = _tool()
    monkeypatch.setattr(tool, "MUTANTS", tool.MUTANTS + [("sfd_ddpm/losses.py", "text that is not there", "x", "gone")])
    monkeypatch.setattr(tool, "run_tests", lambda *a: (_ for _ in ()).throw(AssertionError("tests ran")))
    assert tool.check(TREE, ["tests/test_sfd.py"]) == 3
    out = capsys.readouterr().out
    assert "no longer apply" in out and "gone (its text occurs 0 times)" in out
