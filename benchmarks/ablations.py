"""SDA's main ablation (Table 3 rows, and any other switch) as DVC experiments.

    python benchmarks/ablations.py                      # the Table 3 rows
    python benchmarks/ablations.py --rows no_csm no_cfb # a subset
    python benchmarks/ablations.py --table-only         # render the experiments run so far

Runs in the current repository after `dvc repro`: every row is a `dvc exp run -S ...`, so only
the stages downstream of the changed params run again (upstream outputs come from DVC's
cache). After each row the workspace goes back to the baseline (params, lock and outputs);
then `dvc exp show --json` is rendered by the report stage's ablation table into
benchmarks/results/ablations.md, the workspace (baseline) first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.report import ablation_table, to_markdown  # noqa: E402

#: name -> params overrides; every row of Tables 3-5 and D.1 is a switch.
ROWS = {
    "no_csm": ["semantics.enabled=false"],
    "no_cfb": ["adapt.cfb=false"],
    "no_rrb": ["adapt.rrb=false"],
    "mean_pool_v": ["semantics.extraction=mean_visual"],
    "mean_pool_t": ["semantics.extraction=mean_text"],
    "no_predictor": ["semantics.predictor=false"],
    "no_boundary": ["semantics.boundary=false"],
    "no_si": ["init.si=false"],
    "no_contrastive": ["adapt.contrastive=false"],
    "no_memory": ["adapt.memory=false"],
    "no_ct": ["adapt.ct=false"],
    "no_ho": ["adapt.ho=false"],
    "no_reciprocal": ["adapt.reciprocal_masks=false"],
    "kmeans": ["semantics.clustering=kmeans", "semantics.n_clusters=20"],
    "encoded_q": ["semantics.content=encoded"],
}
TABLE3 = ["no_csm", "no_cfb", "no_rrb"]
SPLIT = "target_test"
METRICS = ("oiou", "miou", "map")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=TABLE3, choices=sorted(ROWS))
    ap.add_argument("--table-only", action="store_true", help="render the experiments run so far")
    args = ap.parse_args()
    for row in [] if args.table_only else args.rows:
        cmd = ["dvc", "exp", "run", "-n", row]
        for item in ROWS[row]:
            cmd += ["-S", item]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        # `dvc exp run` applies the row's params, lock and outputs to the workspace: put the
        # baseline back before the next row and before the table (whose first row it is).
        subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock"], cwd=ROOT, check=True)
        subprocess.run(["dvc", "checkout", "--force"], cwd=ROOT, check=True)
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    df = ablation_table(json.loads(shown))
    # Table 3 reads against the two references of the baseline run, same split.
    evals = json.loads((ROOT / "metrics/eval.json").read_text())
    refs = [
        {
            "experiment": model,
            "changes": "(reference)",
            **{m: evals[model][SPLIT][m] for m in METRICS},
        }
        for model in ("source_only", "oracle")
        if SPLIT in evals.get(model, {})
    ]
    df = pd.concat([df, pd.DataFrame(refs)], ignore_index=True)
    md = to_markdown(df)
    (ROOT / "benchmarks/results/ablations.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
