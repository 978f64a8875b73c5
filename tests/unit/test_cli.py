"""The `emailqueue-operator` command line dispatches and reports usage errors."""
from __future__ import annotations

from emailqueue_operator import __version__
from emailqueue_operator.cli import main


def test_version_and_help(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["scale-everything"]) == 2
    assert "usage: emailqueue-operator" in capsys.readouterr().err
    assert main([]) == 2


def test_plan_dispatches_to_the_planner(capsys):
    code = main(["plan", "--peak-rate", "400", "--base-rate", "20", "--rate-per-replica", "10",
                 "--startup-seconds", "30", "--drain-seconds", "60", "--no-simulate"])
    assert code == 0
    assert "kind: EmailQueue" in capsys.readouterr().out
