"""Where the target gap is: target-test queries with and without a word the source never uses.

    python benchmarks/target_words.py --repos /tmp/v4keep/seed0 /tmp/v4keep/seed1 --out NAME

Per repository (after `dvc repro`), the target test samples that refer to something are split
by whether their query holds one of the embedded benchmark's target synonyms (``navy`` for
``blue``: words no source query uses; ``components.data.synthetic.synonym_map``), and each
model's per-sample IoU from ``predictions/<model>/target_test.parquet`` is averaged per group
(mIoU). A diagnostic: it reads the benchmark's synonym table, which no stage reads.

Writes benchmarks/results/<NAME>.json (per seed and mean ± sd) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.data.synthetic import synonym_map  # noqa: E402
from components.data.vocab import tokenize  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from repro_seeds import mean_std  # noqa: E402

MODELS = ("source_only", "sda", "oracle")
GROUPS = {False: "no target synonym", True: "a target synonym"}


def groups(repo: Path) -> pd.DataFrame:
    """One row per referring target-test sample: its group and each model's IoU."""
    shards = sorted((repo / "data/prepared/target/test").glob("*.parquet"))
    cols = ["sample_id", "query", "n_targets"]
    table = pd.concat([pd.read_parquet(p, columns=cols) for p in shards]).set_index("sample_id")
    synonyms = set(synonym_map())
    table["synonym"] = [any(w in synonyms for w in tokenize(q)) for q in table["query"]]
    for model in MODELS:
        pred = pd.read_parquet(repo / f"predictions/{model}/target_test.parquet")
        table[model] = pred.set_index("sample_id")["iou"]
    return table[table["n_targets"] > 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repos", nargs="+", type=Path, required=True)
    ap.add_argument("--out", default="target_words")
    args = ap.parse_args()
    per_seed = []
    for repo in args.repos:
        t = groups(repo)
        for flag, name in GROUPS.items():
            part = t[t["synonym"] == flag]
            row = {"repo": str(repo), "group": name, "share": len(part) / len(t)}
            row.update({m: float(part[m].mean()) for m in MODELS})
            row["gap_closed"] = (row["sda"] - row["source_only"]) / (
                row["oracle"] - row["source_only"]
            )
            per_seed.append(row)
    df = pd.DataFrame(per_seed)
    keys = ("share", *MODELS, "gap_closed")
    summary = {
        name: {
            k: dict(
                zip(("mean", "sd"), mean_std(df.loc[df["group"] == name, k].tolist()), strict=True)
            )
            for k in keys
        }
        for name in GROUPS.values()
    }
    out = ROOT / f"benchmarks/results/{args.out}.json"
    out.write_text(json.dumps({"per_seed": per_seed, "summary": summary}, indent=2) + "\n")
    print("| group | share | " + " | ".join(MODELS) + " | gap closed |")
    print("|---|---|" + "---|" * (len(MODELS) + 1))
    for name, s in summary.items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
