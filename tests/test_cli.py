import importlib
import inspect

import pytest

from pipelines.cli import COMMANDS, _dests, _parser, main
from tests.conftest import ROOT


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_reaches_its_stage_function(command):
    """Each sub-command's options are exactly the keywords its stage's ``main`` takes."""
    module_name, _, options = COMMANDS[command]
    stage = importlib.import_module(f"pipelines.{module_name}").main
    taken = set(inspect.signature(stage).parameters) - {"params"}
    given = {dest for _, dest, _ in options} | ({"phase"} if module_name == "train" else set())
    assert given == taken
    args = _parser().parse_args([command, *(a for flag, _, _ in options for a in (flag, "x"))])
    assert set(_dests(command)) == given - {"phase"}
    assert all(getattr(args, d) is not None for d in _dests(command))


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "reports"
    code = main(
        ["--params", str(ROOT / "params.yaml"), "report", "--eval", str(tmp_path / "no.json")]
        + ["--out", str(out)]
    )
    assert code == 2
    assert f"adaseg report: error: no such file: {tmp_path / 'no.json'}" in capsys.readouterr().err
    assert not out.exists()


def test_validate(capsys):
    assert main(["--params", str(ROOT / "params.yaml"), "validate"]) == 0
    assert "ok" in capsys.readouterr().out


def test_other_missing_files_keep_their_traceback(tmp_path, monkeypatch):
    """Only a path given on the command line becomes a one-line error; anything else is a bug."""
    import pipelines.report

    def fails(*_a, **_k):
        raise FileNotFoundError(2, "No such file or directory", "/somewhere/else")

    monkeypatch.setattr(pipelines.report, "main", fails)
    argv = ["--params", str(ROOT / "params.yaml"), "report", "--eval", str(tmp_path / "e.json")]
    with pytest.raises(FileNotFoundError):
        main([*argv, "--out", str(tmp_path / "r")])
