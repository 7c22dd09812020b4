"""Conversion throughput and peak memory of ``prepare`` on datasets on disk, per converter.

    python benchmarks/convert_throughput.py --work /tmp/convert --samples 10000 100000 --cpus 1 2

For each converter pair (RefCOCO -> RefCOCO+, GTA5 -> Cityscapes, A2D -> J-HMDB) the tests'
fixture writers (``tests/*_fixtures.py``: the releases' exact formats, tiny images) are scaled
up to about ``--samples`` samples in all, then ``adaseg prepare`` runs on them with a local Ray
instance of ``--cpus`` CPUs (one conversion task per CPU at a time). Reported per run: wall
time of the whole command (Ray start-up included), samples/s, and the peak summed PSS of the
command and all its Ray processes (``benchmarks/_procs.py``): the memory bound, which should
not grow with the dataset's size beyond the driver's annotation index. Writes
``benchmarks/results/convert_throughput.json`` and each fixture conversion's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._procs import run_measured  # noqa: E402
from tests.cityscapes_fixtures import write_cityscapes, write_gta5  # noqa: E402
from tests.conftest import tiny_params  # noqa: E402
from tests.refer_fixtures import write_refer  # noqa: E402
from tests.video_fixtures import write_a2d, write_jhmdb  # noqa: E402

OUT = ROOT / "benchmarks/results/convert_throughput.json"


def build(kind: str, root: Path, samples: int) -> dict:
    """Fixtures of about ``samples`` samples for ``kind``; returns its ``data`` params."""
    if kind == "refcoco":  # 4 sentences an image; the source uses 3 of 5 splits, the target all
        n = max(5, round(samples / 4 / 1.6))
        write_refer(root, "refcoco", "unc", n_images=n)
        write_refer(root, "refcoco+", "unc", n_images=n, seed=1)
        return {"dataset": "refcoco", "target_dataset": "refcoco+"}
    if kind == "gta5":
        write_gta5(root, n=samples // 2)
        write_cityscapes(root, n_train=samples * 2 // 5, n_val=samples // 10)
        return {"task": "semantic", "dataset": "gta5", "target_dataset": "cityscapes"}
    if kind == "a2d":  # ~4 samples per video (2 annotated frames, 1-2 instances)
        write_a2d(root, n_train=max(4, samples // 6), n_test=max(2, samples // 24))
        write_jhmdb(root, n=max(8, samples // 6))
        return {"dataset": "a2d", "target_dataset": "jhmdb"}
    raise ValueError(kind)


def params_for(kind: str, data: dict, root: Path, cpus: int) -> dict:
    raw = tiny_params()
    raw["data"].update({"root": str(root), "shard_size": 500, **data})
    raw["runtime"]["num_cpus"] = cpus
    raw["runtime"]["object_store_memory_mb"] = 256
    if kind == "gta5":  # the semantic task runs DACS, not SDA
        raw["adapt"] = {**{k: v for k, v in raw["adapt"].items() if k != "sda"}, "method": "dacs"}
        raw["tune"].pop("space", None)
    return raw


def measure(kind: str, work: Path, samples: int, cpus: int) -> dict:
    root = work / f"{kind}-{samples}" / "data"
    marker = root.parent / "BUILT"
    if not marker.is_file():
        shutil.rmtree(root.parent, ignore_errors=True)
        t0 = time.perf_counter()
        data = build(kind, root, samples)
        marker.write_text(json.dumps({"data": data, "seconds": time.perf_counter() - t0}))
    data = json.loads(marker.read_text())["data"]
    repo = root.parent / f"run-{cpus}cpu"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(params_for(kind, data, root, cpus)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/m.db"}
    cmd = [sys.executable, "-m", "pipelines.cli", "prepare", "--out", "prep"]
    cmd += ["--metrics", "prepare.json"]
    res = run_measured(cmd, cwd=repo, env=env)
    if res["returncode"]:
        sys.exit(f"{kind} {samples} {cpus} CPU failed:\n{res['output'][-3000:]}")
    stats = json.loads((repo / "prep/stats.json").read_text())
    n = sum(s["n"] for s in stats.values())
    row = {
        "converter": kind,
        "samples": n,
        "cpus": cpus,
        "wall_s": round(res["wall_s"], 1),
        "samples_per_s": round(n / res["wall_s"], 1),
        "peak_pss_mib": round(res["peak_pss_mib"], 1),
        "peak_rss_mib": round(res["peak_rss_mib"], 1),
    }
    print(json.dumps(row), flush=True)
    return {"row": row, "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--samples", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--converters", nargs="+", default=["refcoco", "gta5", "a2d"])
    args = ap.parse_args()
    rows, summaries = [], {}
    for kind in args.converters:
        for samples in args.samples:
            for cpus in args.cpus:
                got = measure(kind, args.work, samples, cpus)
                rows.append(got["row"])
                summaries[f"{kind}-{samples}"] = got["stats"]
    previous = json.loads(OUT.read_text()) if OUT.is_file() else {}
    keep = [r for r in previous.get("rows", []) if (r["converter"], r["cpus"]) not in
            {(x["converter"], x["cpus"]) for x in rows} or r["samples"] not in
            {x["samples"] for x in rows if x["converter"] == r["converter"]}]  # fmt: skip
    summaries = {**previous.get("summaries", {}), **summaries}
    out = {"command": " ".join(sys.argv), "rows": keep + rows, "summaries": summaries}
    OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
