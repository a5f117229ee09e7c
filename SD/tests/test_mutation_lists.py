"""The mutation list stays in step with the code: a mutation whose text is gone is a failure, not a skip."""
import importlib.util
from pathlib import Path

SD = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("mutation_check", SD / "tests" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_listed_mutation_applies_to_the_current_code():
    assert _tool().stale_mutations() == []


def test_a_stale_mutation_stops_the_tool_before_any_test_runs(monkeypatch, capsys):
    tool = _tool()
    monkeypatch.setattr(tool, "MUTATIONS", tool.MUTATIONS + [("gone", "sfd_sd/losses.py", "text that is not there", "x")])
    monkeypatch.setattr(tool, "run_tests", lambda: (_ for _ in ()).throw(AssertionError("tests ran")))
    assert tool.main("gone") == 3
    out = capsys.readouterr().out
    assert "no longer apply" in out and "gone: sfd_sd/losses.py (its text occurs 0 times)" in out
