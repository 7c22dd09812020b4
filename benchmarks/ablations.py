"""SDA's main ablation (Table 3 rows, and any other switch) as DVC experiments.

    python benchmarks/ablations.py                      # the Table 3 rows
    python benchmarks/ablations.py --rows no_csm no_cfb # a subset
    python benchmarks/ablations.py --table-only         # render the experiments run so far
    python benchmarks/ablations.py --aggregate R0 R1 R2 # mean ± sd over repos, one seed each
    python benchmarks/ablations.py --rows no_word_grounding --snapshot NAME  # one JSON record

Runs in the current repository after `dvc repro`: every row is a `dvc exp run -S ...`, so only
the stages downstream of the changed params run again (upstream outputs come from DVC's
cache). After each row the workspace goes back to the baseline (params, lock and outputs);
then `dvc exp show --json` is rendered by the report stage's ablation table into
benchmarks/results/ablations.md, the workspace (baseline) first. ``--snapshot NAME`` also keeps
every model's target-test metrics of the baseline and of each row, the setting (seed, gap
knobs) and the baseline's word grounding in benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.report import ablation_table, experiment_runs, to_markdown  # noqa: E402

#: name -> params overrides; every row of Tables 3-5 and D.1 is a switch.
ROWS = {
    "no_csm": ["semantics.enabled=false"],
    "no_cfb": ["adapt.sda.cfb=false"],
    "no_rrb": ["adapt.sda.rrb=false"],
    "mean_pool_v": ["semantics.extraction=mean_visual"],
    "mean_pool_t": ["semantics.extraction=mean_text"],
    "no_predictor": ["semantics.predictor=false"],
    "no_boundary": ["semantics.boundary=false"],
    "no_si": ["init.si=false"],
    "no_contrastive": ["adapt.sda.contrastive=false"],
    "no_memory": ["adapt.sda.memory=false"],
    "no_ct": ["adapt.sda.ct=false"],
    "no_ho": ["adapt.sda.ho=false"],
    "no_reciprocal": ["adapt.sda.reciprocal_masks=false"],
    "kmeans": ["semantics.clustering=kmeans", "semantics.n_clusters=20"],
    "encoded_q": ["semantics.content=encoded"],
    "cfb_peak_anchors": ["adapt.sda.anchors=majority_or_peak"],  # not a paper row: our option
    "word_grounding": ["semantics.word_grounding=visual"],  # ours: target-only words grounded
    "no_word_grounding": ["semantics.word_grounding=none"],
}
TABLE3 = ["no_csm", "no_cfb", "no_rrb"]
SPLIT = "target_test"
METRICS = ("oiou", "miou", "map")
PAIRED = ("d_oiou", "gap_closed")  # per seed, then mean and spread


def exp_show(repo: Path) -> list:
    """``dvc exp show --json`` of ``repo``, parsed."""
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(shown)


def require(repo: Path, names: list[str], present) -> None:
    """Stop, naming them, when experiments ``names`` are not among ``present``."""
    missing = [n for n in names if n not in present]
    if missing:
        raise SystemExit(f"{repo}: no experiment named {', '.join(missing)}; run the rows first")


def table_for(repo: Path, shown: list | None = None) -> pd.DataFrame:
    """The ablation table of one repository (from ``shown``, its parsed ``dvc exp show``, if
    given): its experiments (workspace first) and the two references of its baseline run, SDA
    on the target test split."""
    df = ablation_table(shown if shown is not None else exp_show(repo))
    # Table 3 reads against the two references of the baseline run, same split.
    evals = json.loads((repo / "metrics/eval.json").read_text())
    refs = [
        {
            "experiment": model,
            "changes": "(reference)",
            **{m: evals[model][SPLIT][m] for m in METRICS},
        }
        for model in ("source_only", "oracle")
        if SPLIT in evals.get(model, {})
    ]
    return pd.concat([df, pd.DataFrame(refs)], ignore_index=True)


def snapshot(repo: Path, rows: list[str], shown: list) -> dict:
    """The record ``--snapshot`` writes: the repository's setting, and every model's metrics
    on the target test split for its baseline (the workspace) and each of ``rows``
    (``shown``: the repository's parsed ``dvc exp show``)."""
    runs = {r["experiment"]: r for r in experiment_runs(shown, SPLIT)}
    require(repo, ["workspace", *rows], runs)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    grounding = repo / "semantics/word_grounding.json"
    return {
        "setting": {"seed": params["seed"], "gap": params["data"]["gap"]},
        "repo": str(repo),
        "command": " ".join(["python", "benchmarks/ablations.py", *sys.argv[1:]]),
        "split": SPLIT,
        "runs": {name: runs[name] for name in ["workspace", *rows]},
        "word_grounding": json.loads(grounding.read_text()) if grounding.is_file() else None,
    }


def aggregate(repos: list[Path], rows: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and standard deviation of each row over repositories (one seed each), and the
    per-seed rows they come from."""
    names = ["workspace", *rows, "source_only", "oracle"]
    per_seed = []
    for repo in repos:
        seed = yaml.safe_load((repo / "params.yaml").read_text())["seed"]
        df = table_for(repo).drop_duplicates("experiment").set_index("experiment")
        require(repo, names, df.index)
        df = df.loc[names].assign(seed=seed)
        # paired with the same seed's SDA, and as a share of its source-only -> oracle gap
        df["d_oiou"] = df["oiou"] - df.loc["workspace", "oiou"]
        lo, hi = df.loc["source_only", "oiou"], df.loc["oracle", "oiou"]
        df["gap_closed"] = (df["oiou"] - lo) / (hi - lo)
        per_seed.append(df)
    long = pd.concat(per_seed).reset_index()
    out = long.groupby("experiment", sort=False).agg(
        changes=("changes", "first"),
        seeds=("seed", lambda s: " ".join(map(str, s))),
        **{f"{m}_mean": (m, "mean") for m in (*METRICS, *PAIRED)},
        **{f"{m}_sd": (m, "std") for m in (*METRICS, *PAIRED)},
    )
    return out.loc[names].reset_index(), long


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=TABLE3, choices=sorted(ROWS))
    ap.add_argument("--table-only", action="store_true", help="render the experiments run so far")
    ap.add_argument(
        "--aggregate",
        nargs="+",
        type=Path,
        metavar="REPO",
        help="only aggregate --rows over repositories that ran them (one seed each)",
    )
    ap.add_argument("--out", default="ablations_seeds", help="--aggregate's result file name")
    ap.add_argument(
        "--snapshot",
        metavar="NAME",
        help="also write benchmarks/results/NAME.json: the baseline's and the rows' metrics",
    )
    args = ap.parse_args()
    if args.aggregate:
        summary, long = aggregate(args.aggregate, args.rows)
        out = ROOT / f"benchmarks/results/{args.out}.json"
        out.write_text(
            json.dumps(
                {
                    "split": SPLIT,
                    "model": "sda",
                    "summary": summary.to_dict("records"),
                    "per_seed": long.to_dict("records"),
                },
                indent=2,
            )
            + "\n"
        )
        cells = summary[["experiment", "changes", "seeds"]].copy()
        for m in (*METRICS, *PAIRED):
            cells[m] = [
                f"{a:.3f} ± {b:.3f}"
                for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_sd"], strict=True)
            ]
        md = to_markdown(cells)
        out.with_suffix(".md").write_text(md + "\n")
        print(md)
        return
    # the baseline's params and lock as they are now (committed or not, e.g. a repository
    # `stage_times.py --keep` made, whose lock git does not track)
    baseline = {name: (ROOT / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    for row in [] if args.table_only else args.rows:
        cmd = ["dvc", "exp", "run", "-n", row]
        for item in ROWS[row]:
            cmd += ["-S", item]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        # `dvc exp run` applies the row's params, lock and outputs to the workspace: put the
        # baseline back before the next row and before the table (whose first row it is).
        for name, content in baseline.items():
            (ROOT / name).write_bytes(content)
        subprocess.run(["dvc", "checkout", "--force", "dvc.yaml"], cwd=ROOT, check=True)
    shown = exp_show(ROOT)
    md = to_markdown(table_for(ROOT, shown))
    (ROOT / "benchmarks/results/ablations.md").write_text(md + "\n")
    print(md)
    if args.snapshot:
        record = snapshot(ROOT, args.rows, shown)
        out = ROOT / f"benchmarks/results/{args.snapshot}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
