"""The methods comparison on the default benchmark: wall time and the tables.

    python benchmarks/compare_methods.py --repo /tmp/bench --seeds 0
    python benchmarks/compare_methods.py --repo /tmp/bench --seeds 0 1 2   # reuses seed 0
    python benchmarks/compare_methods.py --repo /tmp/bench --seeds 1 2 --collect  # tables only
    python benchmarks/compare_methods.py --merge benchmarks/results/compare_seeds0_records.json \
        benchmarks/results/compare_seeds12_records.json                  # seeds run apart

``--repo`` is a clone of this repository (the comparison's work folder lives in it, so a later
call with more seeds reuses the finished units). Runs ``adaseg compare`` with the repository's
own code (``python -m pipelines.cli`` from its root), timed, and copies the report to
``benchmarks/results/compare_seeds<seeds>.{md,csv,json}`` with the wall time and the number of
units run vs reused, plus ``compare_seeds<seeds>_records.json``: every evaluated model's
target-test metrics per task and seed, the raw material of the tables.

``--merge`` pools records files of comparisons run separately (other clones, other days, the
same code) and renders the same tables over all their seeds with the comparison's own
``write_report``; a (task, seed, model) present in two files is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.comparison import Record, records_from_eval, write_report  # noqa: E402

OUT = ROOT / "benchmarks/results"


def records_of(work: Path, seeds: list[int]) -> list[Record]:
    """Every ``evaluate`` unit's records under a comparison's work folder."""
    records = []
    for seed in seeds:
        for path in sorted((work / f"seed{seed}").glob("*/eval.json")):
            records += records_from_eval(json.loads(path.read_text()), path.parent.name, seed)
    return records


def save_records(records: list[Record], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")


def load_records(paths: list[Path]) -> list[Record]:
    seen: dict[tuple, Path] = {}
    records = []
    for path in paths:
        for row in json.loads(path.read_text()):
            rec = Record(**row)
            key = (rec.task, rec.seed, rec.model)
            if key in seen:
                sys.exit(f"{path}: {key} is also in {seen[key]}")
            seen[key] = path
            records.append(rec)
    return records


def report(records: list[Record], tag: str, extra: dict) -> dict:
    """Tables of ``records`` as ``compare_seeds<tag>.{md,csv,json}`` (+ per-class, chart)."""
    folder = OUT / f"compare_seeds{tag}_report"
    folder.mkdir(exist_ok=True)
    metrics = write_report(records, folder)
    for name in ("results.md", "results.csv"):
        shutil.copy(folder / name, OUT / f"compare_seeds{tag}.{name.split('.')[1]}")
    if (folder / "per_class.csv").is_file():
        shutil.copy(folder / "per_class.csv", OUT / f"compare_seeds{tag}_per_class.csv")
    shutil.copy(folder / "comparison.png", OUT / f"compare_seeds{tag}.png")
    shutil.rmtree(folder)
    summary = {**extra, "seeds": sorted({r.seed for r in records}), "metrics": metrics}
    (OUT / f"compare_seeds{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(repo: Path, seeds: list[int]) -> None:
    listed = "[" + ", ".join(map(str, seeds)) + "]"
    cmd = [sys.executable, "-m", "pipelines.cli", "-S", f"compare.seeds={listed}", "compare"]
    cmd += ["--work", "compare/work", "--out", "compare/report"]
    cmd += ["--metrics", "metrics/compare.json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"compare failed:\n{log[-3000:]}")
    tag = "".join(map(str, seeds))
    records = records_of(repo / "compare/work", seeds)
    save_records(records, OUT / f"compare_seeds{tag}_records.json")
    summary = report(
        records,
        tag,
        {
            "command": " ".join(cmd[1:]),
            "wall_s": round(wall, 1),
            "units_run": len(re.findall(r"compare: running ", log)),
            "units_reused": len(re.findall(r"up to date", log)),
        },
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--merge", type=Path, nargs="+", help="records files to pool")
    ap.add_argument(
        "--collect", action="store_true", help="only read --repo's finished comparison, no run"
    )
    args = ap.parse_args()
    if args.collect and args.repo:
        tag = "".join(map(str, args.seeds))
        records = records_of(args.repo / "compare/work", args.seeds)
        save_records(records, OUT / f"compare_seeds{tag}_records.json")
        previous = OUT / f"compare_seeds{tag}.json"
        extra = json.loads(previous.read_text()) if previous.is_file() else {}
        extra.pop("metrics", None)
        report(records, tag, extra)
    elif args.merge:
        records = load_records(args.merge)
        tag = "".join(map(str, sorted({r.seed for r in records})))
        files = [str(p.resolve().relative_to(ROOT)) for p in args.merge]
        summary = report(records, tag, {"merged": files})
        print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=2))
    elif args.repo:
        run(args.repo, args.seeds)
    else:
        ap.error("give --repo (run a comparison) or --merge (pool records files)")


if __name__ == "__main__":
    main()
