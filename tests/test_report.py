"""The report tables: gap closed, markdown rendering, the ablation table from `dvc exp show`."""

import pandas as pd
import pytest

from pipelines.report import ablation_table, experiment_runs, table, to_markdown


def _eval(oiou):
    return {"target_test": {"oiou": oiou, "miou": oiou, "map": oiou / 2}}


def test_gap_closed_is_relative_to_source_only_and_oracle():
    df = table({"source_only": _eval(0.2), "sda": _eval(0.35), "oracle": _eval(0.5)})
    closed = df.set_index("model")["gap_closed_oiou"]
    assert closed["source_only"] == 0 and closed["oracle"] == 1
    assert closed["sda"] == pytest.approx(0.5)
    md = to_markdown(df)
    assert md.splitlines()[0].startswith("| model | split | oiou")
    assert "| sda | target_test | 0.350 |" in md


def test_ablation_table_from_exp_show_json():
    def node(name, lam, cfb, oiou):
        return {
            "rev": name * 3,
            "name": name,
            "data": {
                "params": {
                    "params.yaml": {
                        "data": {"adapt": {"lambda2": lam, "cfb": cfb}, "runtime": {"x": name}}
                    }
                },
                "metrics": {"metrics/eval.json": {"data": {"sda": _eval(oiou)}}},
            },
        }

    exp_show = [  # as dvc writes it: the workspace has a rev but no name
        {
            **node("workspace", 0.1, True, 0.4),
            "rev": "workspace",
            "name": None,
            "experiments": None,
        },
        {
            **node("main", 0.1, True, 0.4),
            "experiments": [
                {"revs": [node("no-cfb", 0.1, False, 0.3)]},
                {"revs": [node("no-ho", 0.0, True, 0.38)]},
            ],
        },
    ]
    df = ablation_table(exp_show)
    rows = df.set_index("experiment")
    assert rows.loc["workspace", "changes"] == "(baseline)"
    assert rows.loc["no-cfb", "changes"] == "adapt.cfb=False"  # runtime.* never counts
    assert rows.loc["no-ho", "oiou"] == 0.38
    assert len(df) == 3  # "main" equals the baseline and is listed once
    runs = {r["experiment"]: r for r in experiment_runs(exp_show)}  # --snapshot's records
    assert list(runs) == ["workspace", "no-cfb", "no-ho"]
    assert runs["no-cfb"]["eval"] == {"sda": _eval(0.3)["target_test"]}
    with pytest.raises(ValueError, match="no experiment"):
        ablation_table([{"rev": "x", "data": None}])
    assert isinstance(df, pd.DataFrame)
