"""The methods comparison on the default benchmark: wall time and the tables.

    python benchmarks/compare_methods.py --repo /tmp/bench --seeds 0
    python benchmarks/compare_methods.py --repo /tmp/bench --seeds 0 1 2   # reuses seed 0

``--repo`` is a clone of this repository (the comparison's work folder lives in it, so a later
call with more seeds reuses the finished units). Runs ``adaseg compare`` with the repository's
own code (``python -m pipelines.cli`` from its root), timed, and copies the report to
``benchmarks/results/compare_seeds<seeds>.{md,csv,json}`` with the wall time and the number of
units run vs reused.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    seeds = "[" + ", ".join(map(str, args.seeds)) + "]"
    cmd = [sys.executable, "-m", "pipelines.cli", "-S", f"compare.seeds={seeds}", "compare"]
    cmd += ["--work", "compare/work", "--out", "compare/report"]
    cmd += ["--metrics", "metrics/compare.json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"compare failed:\n{log[-3000:]}")
    tag = "".join(map(str, args.seeds))
    out = ROOT / "benchmarks/results"
    shutil.copy(args.repo / "compare/report/results.md", out / f"compare_seeds{tag}.md")
    shutil.copy(args.repo / "compare/report/results.csv", out / f"compare_seeds{tag}.csv")
    summary = {
        "command": " ".join(cmd[1:]),
        "seeds": args.seeds,
        "wall_s": round(wall, 1),
        "units_run": len(re.findall(r"compare: running ", log)),
        "units_reused": len(re.findall(r"up to date", log)),
        "metrics": json.loads((args.repo / "metrics/compare.json").read_text()),
    }
    (out / f"compare_seeds{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=2))


if __name__ == "__main__":
    main()
