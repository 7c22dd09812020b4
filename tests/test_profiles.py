"""Paper-scale params overlays (``infra/profiles``): each one validates on params.yaml, and the
arguments ``adaseg profile`` prints, applied by DVC's own ``--set-param`` code, turn params.yaml
into exactly the profile's params."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from components.config import parse_params
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (ROOT / "infra/profiles").glob("*.yaml"))


def _get(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw[part]
    return raw


@pytest.mark.parametrize("name", PROFILES)
def test_profile_args_make_params_yaml_the_profile(name, tmp_path, monkeypatch, capsys):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` runs

    monkeypatch.chdir(ROOT)
    assert main(["-S", "data.root=/elsewhere", "profile", name, "--args"]) == 0
    tokens = capsys.readouterr().out.split()
    assert tokens[0::2] == ["-S"] * (len(tokens) // 2)
    values = tokens[1::2]
    assert [v for v in values if v.startswith("++data.root=")] == ["++data.root=/elsewhere"]
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, values)
    raw = yaml.safe_load(params.read_text())
    parsed = parse_params(raw).model_dump(mode="json")
    profile = yaml.safe_load((ROOT / f"infra/profiles/{name}.yaml").read_text())
    for key, value in profile.items():
        want = "/elsewhere" if key == "data.root" else value
        assert _get(raw if value is None else parsed, key) == want, key  # null: the default


def test_a_profile_that_is_not_flat_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapt:\n  epochs: 3\n")
    assert main(["profile", str(bad)]) == 2
    assert "a profile is a flat mapping of dotted keys" in capsys.readouterr().err
    assert main(["profile", "no-such-profile"]) == 2
