"""Default `dvc repro` on fresh copies of the repo, one per seed: wall time, peak memory and the
source-only vs oracle figures (mean and spread over seeds).

    python benchmarks/repro_seeds.py --seeds 0 1 2
    python benchmarks/repro_seeds.py --seeds 1 --keep /tmp/repos  # keep /tmp/repos/seed1

Writes benchmarks/results/repro_seeds.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["oiou", "miou", "map"]


def fresh_copy(dst: Path, seed: int, overrides: dict) -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if rel == "dvc.lock":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["seed"] = seed
    for key, value in overrides.items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)


def repro_env() -> dict:
    """This environment for a benchmark's `dvc repro`: this venv's tools first, no tracking
    server or Ray cluster inherited (the embedded defaults)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(var, None)
    return env


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("-S", "--set", action="append", default=[], help="key=value (YAML)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/repro_seeds.json"))
    ap.add_argument("--keep", type=Path, help="keep each repository as KEEP/seed<N>")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    env = repro_env()
    runs = []
    for seed in args.seeds:
        with contextlib.ExitStack() as stack:
            if args.keep:
                d = args.keep / f"seed{seed}"
                d.mkdir(parents=True)  # refuses to reuse an old one
            else:
                d = stack.enter_context(tempfile.TemporaryDirectory())
            fresh_copy(Path(d), seed, overrides)
            res = run_measured(["dvc", "repro"], cwd=d, env=env)
            if res["returncode"] != 0:
                print(res["output"][-5000:])
                raise SystemExit(f"seed {seed}: dvc repro failed")
            evals = json.loads((Path(d) / "metrics/eval.json").read_text())
        runs.append(
            {
                "seed": seed,
                "wall_s": res["wall_s"],
                "peak_rss_mib": res["peak_rss_mib"],
                "peak_pss_mib": res["peak_pss_mib"],
                "eval": evals,
            }
        )
        print(
            f"seed {seed}: {res['wall_s']:.0f} s, peak RSS {res['peak_rss_mib']:.0f} MiB,"
            f" PSS {res['peak_pss_mib']:.0f} MiB",
            flush=True,
        )

    summary = {}
    for model in runs[0]["eval"]:
        for split in runs[0]["eval"][model]:
            for k in KEYS:
                m, s = mean_std([r["eval"][model][split][k] for r in runs])
                summary[f"{model}/{split}/{k}"] = {"mean": m, "std": s}
    ratio = [
        r["eval"]["source_only"]["target_test"]["oiou"] / r["eval"]["oracle"]["target_test"]["oiou"]
        for r in runs
    ]

    def ms(xs):
        m, s = mean_std(xs)
        return {"mean": m, "std": s}

    summary["source_only_over_oracle_target_oiou"] = ms(ratio)
    summary["wall_s"] = ms([r["wall_s"] for r in runs])
    summary["peak_rss_mib"] = ms([r["peak_rss_mib"] for r in runs])
    summary["peak_pss_mib"] = ms([r["peak_pss_mib"] for r in runs])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"overrides": overrides, "runs": runs, "summary": summary}, indent=2) + "\n"
    )
    print("| model | split | oIoU | mIoU | mAP |\n|---|---|---|---|---|")
    for model in runs[0]["eval"]:
        for split in runs[0]["eval"][model]:
            cells = [
                f"{summary[f'{model}/{split}/{k}']['mean']:.3f} ± "
                f"{summary[f'{model}/{split}/{k}']['std']:.3f}"
                for k in KEYS
            ]
            print(f"| {model} | {split} | " + " | ".join(cells) + " |")
    for k in ("source_only_over_oracle_target_oiou", "wall_s", "peak_rss_mib", "peak_pss_mib"):
        print(f"{k}: {summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}")


if __name__ == "__main__":
    main()
