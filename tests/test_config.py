import pytest
import yaml

from components.config import ParamsError, load_params, parse_params
from tests.conftest import ROOT, real_params


def test_real_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.adapt.sda.gamma_min < params.adapt.sda.gamma_max
    assert params.semantics.tau == 0.2  # paper default


def _error_for(mutate) -> str:
    raw = real_params()
    mutate(raw)
    with pytest.raises(ParamsError) as info:
        parse_params(raw, "params.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["semantics"].update(tau=-0.1), "semantics.tau"),
        (
            lambda r: r["adapt"]["sda"].update(gamma_min=0.9, gamma_max=0.5),
            "adapt.sda: gamma_min (0.9) must be < gamma_max (0.5)",
        ),
        (lambda r: r["adapt"].update(method="nope"), "adapt.method"),
        (lambda r: r.pop("pretrain"), "pretrain: missing section"),
        (lambda r: r["pretrain"].update(epocs=3), "pretrain.epocs: unknown field"),
        (lambda r: r["pretrain"].update(epochs=0), "pretrain.epochs"),
        (lambda r: r["semantics"].update(beta=1.5), "semantics.beta"),
        (lambda r: r["adapt"]["sda"].update(lambda1=-1), "adapt.sda.lambda1"),
        (lambda r: r["adapt"].update(gamma_max=0.5), "adapt.gamma_max: unknown field"),
        (lambda r: r["adapt"].update(dida={"phi": 0.5}), "section adapt.dida is given but"),
        (lambda r: r["data"].update(task="semantic"), "sda does not run on data.task 'semantic'"),
        (lambda r: r["data"].update(task="depth"), "data.task"),
        (
            lambda r: (r["adapt"].update(method="dacs"), r["adapt"].pop("sda")),
            "tune.space.adapt.sda.lambda1: adapt.method is 'dacs' (sweep its fields as adapt.dacs",
        ),
        (lambda r: r["data"]["query_mix"].update(one=0.9), "data.query_mix"),
        (lambda r: r["data"].update(min_objects=5, max_objects=2), "min_objects"),
        (lambda r: r["model"].update(embeddings="glove"), "glove_path is required"),
        (lambda r: r["semantics"].update(grounding_min_score="auto"), "grounding_min_score"),
        (lambda r: r["semantics"].update(grounding_min_score=1.5), "grounding_min_score"),
        (lambda r: r["semantics"].update(grounding_alpha=1), "semantics.grounding_alpha"),
    ],
)
def test_bad_params_name_the_field(mutate, expected):
    assert expected in _error_for(mutate)


def test_every_bad_field_is_reported_at_once():
    def mutate(r):
        r["semantics"]["tau"] = 0
        r["oracle"]["lr"] = -1

    msg = _error_for(mutate)
    assert "semantics.tau" in msg and "oracle.lr" in msg


def test_overrides_and_bad_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(real_params()))
    assert load_params(path, {"pretrain.epochs": 3}).pretrain.epochs == 3
    with pytest.raises(ParamsError, match="no section 'nope'"):
        load_params(path, {"nope.x": 1})
    # switching method with overrides alone, as `dvc exp run -S` can: the SDA section and its
    # sweep entries set to null, the new method's section created by its first field
    switched = load_params(
        path,
        {"adapt.method": "dacs", "adapt.sda": None, "tune.space": None, "adapt.dacs.ema": 0.9},
    )
    assert switched.adapt.method_config.ema == 0.9 and switched.adapt.sda is None
    assert list(switched.tune.flat_space()) == ["adapt.lr"]
    path.write_text("seed: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_switching_method_on_the_command_line_follows_the_errors_advice():
    """`dvc exp run -S adapt.method=dacs` names the overrides that make it valid, and those
    overrides are enough."""
    overrides = {"adapt.method": "dacs"}
    for advice in ("adapt.sda=null", "tune.space=null"):
        with pytest.raises(ParamsError) as info:
            load_params(ROOT / "params.yaml", overrides)
        assert f"-S {advice}" in str(info.value)
        key, _, _ = advice.partition("=")
        overrides[key] = None
    params = load_params(ROOT / "params.yaml", overrides)
    assert params.adapt.method == "dacs" and params.adapt.sda is None
