"""Where the default `dvc repro`'s wall time goes: one fresh repository, one timed run, a
per-stage table.

    python benchmarks/stage_times.py                 # seed 0, defaults
    python benchmarks/stage_times.py --seed 1 -S pretrain.amp=true --tag amp
    python benchmarks/stage_times.py --ray-head --tag head   # stages join one Ray instance

Every line of DVC's output is timestamped on arrival. A stage runs from its
``Running stage '<name>'`` line until DVC's next ``Updating lock file`` line (its command has
then exited); what follows until the next stage starts is DVC's own bookkeeping (hashing the
outputs, the lock file). A training stage's epochs are read from its one-line-per-epoch
progress (``<stage> epoch i/n: ..., seconds S, ..., val_seconds V``): S is the training pass, V
the validation after it. *Start-up* is the time from the stage's start to the end of its first
epoch, less that epoch's S + V (process start, imports, reading the inputs, ``ray.init``, Ray
Train starting its controller and worker, building the model); *after epochs* runs from the
last epoch line to the stage's end (collecting the result, writing outputs and figures, MLflow,
shutting Ray down). The non-training stages' time is their own work (conversion, clustering,
inference) plus the same process and Ray start-up.

Writes benchmarks/results/stage_times[_<tag>].json and prints the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import run_measured  # noqa: E402
from repro_seeds import fresh_copy, repro_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START = re.compile(r"Running stage '([\w-]+)'")
LOCK = re.compile(r"(Updating|Generating) lock file")
EPOCH = re.compile(r"^\s*(?:\(.*?\)\s*)?([\w-]+) epoch (\d+)/(\d+): (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray's colour codes around a worker's prefix


def epoch_row(text: str) -> dict[str, float]:
    """``loss 0.46, lr 0.0003, seconds 18.8, val_seconds 0.8`` -> {key: value}."""
    out = {}
    for item in text.split(", "):
        key, _, value = item.partition(" ")
        with contextlib.suppress(ValueError):  # a non-numeric field
            out[key] = float(value)
    return out


def stage_table(lines: list[tuple[float, str]], wall: float) -> list[dict]:
    """Per stage: wall, epochs (train / val), start-up, after epochs, DVC bookkeeping."""
    stages: list[dict] = []
    for t, text in lines:
        text = ANSI.sub("", text)
        if m := START.search(text):
            stages.append({"stage": m.group(1), "start": t, "end": None, "epochs": []})
        elif stages and stages[-1]["end"] is None and LOCK.search(text):
            stages[-1]["end"] = t
        elif stages and (m := EPOCH.match(text)) and m.group(1) == stages[-1]["stage"]:
            stages[-1]["epochs"].append((t, epoch_row(m.group(4))))
    rows = []
    for i, s in enumerate(stages):
        end = s["end"] if s["end"] is not None else wall
        nxt = stages[i + 1]["start"] if i + 1 < len(stages) else wall
        row = {"stage": s["stage"], "wall_s": end - s["start"], "dvc_s": nxt - end}
        if s["epochs"]:
            train = sum(e.get("seconds", 0.0) for _, e in s["epochs"])
            val = sum(e.get("val_seconds", 0.0) for _, e in s["epochs"])
            t1, first = s["epochs"][0]
            row.update(
                epochs=len(s["epochs"]),
                train_s=train,
                val_s=val,
                startup_s=t1 - s["start"] - first.get("seconds", 0) - first.get("val_seconds", 0),
                after_s=end - s["epochs"][-1][0],
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict], wall: float) -> str:
    head = (
        "| stage | wall (s) | epochs: train + val (s) | start-up (s) | after epochs (s) "
        "| DVC (s) |\n|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        if "train_s" in r:
            ep = f"{r['epochs']} × : {r['train_s']:.0f} + {r['val_s']:.0f}"
            su, af = f"{r['startup_s']:.1f}", f"{r['after_s']:.1f}"
        else:
            ep, su, af = "–", "–", "–"
        out.append(f"| {r['stage']} | {r['wall_s']:.0f} | {ep} | {su} | {af} | {r['dvc_s']:.1f} |")
    train = sum(r.get("train_s", 0) for r in rows)
    val = sum(r.get("val_s", 0) for r in rows)
    fixed = sum(r.get("startup_s", 0) + r.get("after_s", 0) for r in rows)
    dvc = sum(r["dvc_s"] for r in rows)
    startup = sum(r.get("startup_s", 0) for r in rows)
    after = sum(r.get("after_s", 0) for r in rows)
    out.append(
        f"| **all** | **{wall:.0f}** | {train:.0f} + {val:.0f} | {startup:.0f} | {after:.0f} "
        f"| {dvc:.0f} |"
    )
    out.append(
        f"\nTraining epochs {train + val:.0f} s of {wall:.0f} s ({(train + val) / wall:.0%}); "
        f"training stages' start-up and wind-down {fixed:.0f} s ({fixed / wall:.0%}); "
        f"DVC {dvc:.0f} s ({dvc / wall:.0%})."
    )
    return "\n".join(out)


def start_head(env: dict) -> str:
    """A local Ray head on loopback with this machine's CPUs, token auth on (``env`` gets the
    token, so the stages can join); returns its address."""
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node addresses stay 127.0.0.1
    port = 6390
    cmd = ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1"]
    cmd += ["--include-dashboard=false", f"--num-cpus={os.cpu_count()}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-S", "--set", action="append", default=[], help="key=value (YAML)")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--keep", type=Path, help="keep the repository here")
    ap.add_argument(
        "--ray-head",
        action="store_true",
        help="start one local Ray head (`ray start --head`) first and let every stage join it "
        "through RAY_ADDRESS, instead of each stage starting its own instance",
    )
    ap.add_argument("--table", type=Path, help="only print the table of a saved result file")
    args = ap.parse_args()
    if args.table:
        record = json.loads(args.table.read_text())
        lines = [(float(x[:7]), x[8:]) for x in record["log"]]
        record["stages"] = stage_table(lines, record["wall_s"])
        args.table.write_text(json.dumps(record, indent=1) + "\n")
        print(markdown(record["stages"], record["wall_s"]))
        return
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    env = repro_env()
    with tempfile.TemporaryDirectory() as tmp:
        d = args.keep or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        fresh_copy(d, args.seed, overrides)
        env["PYTHONPATH"] = str(d)  # the copy's code, whatever happens to this checkout meanwhile
        if args.ray_head:
            env["RAY_ADDRESS"] = start_head(env)
        try:
            res = run_measured(["dvc", "repro"], cwd=d, env=env)
        finally:
            if args.ray_head:
                subprocess.run(["ray", "stop"], env=env, capture_output=True)
        if res["returncode"] != 0:
            print(res["output"][-5000:])
            raise SystemExit("dvc repro failed")
        evals = json.loads((d / "metrics/eval.json").read_text())
    rows = stage_table(res["lines"], res["wall_s"])
    table = markdown(rows, res["wall_s"])
    name = "stage_times" + (f"_{args.tag}" if args.tag else "") + ".json"
    out = ROOT / "benchmarks/results" / name
    record = {
        "seed": args.seed,
        "overrides": overrides,
        "ray_head": args.ray_head,
        "wall_s": res["wall_s"],
        "peak_pss_mib": res["peak_pss_mib"],
        "peak_rss_mib": res["peak_rss_mib"],
        "stages": rows,
        "eval": evals,
        "log": [f"{t:7.1f} {text}" for t, text in res["lines"]],
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    print(f"\npeak summed PSS {res['peak_pss_mib'] / 1024:.2f} GiB; written to {out}")


if __name__ == "__main__":
    main()
