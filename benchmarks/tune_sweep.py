"""Sweep benchmarks: ASHA vs no early stopping, and the tau / beta sensitivity curves.

Runs ``adaseg tune`` in a repository whose default pipeline has been reproduced (``dvc repro``
done: data, stage-1 / init models, semantics, masks exist), so only the sweeps are timed.

    python benchmarks/tune_sweep.py --repo . asha          # 16-trial ASHA vs 16-trial FIFO
    python benchmarks/tune_sweep.py --repo . compare       # (re)do the per-trial comparison
    python benchmarks/tune_sweep.py --repo . sensitivity   # grids over tau, then beta
    python benchmarks/tune_sweep.py --repo . sensitivity --tag v4 --taus 0.05 0.2 1.0
        # ... written to tune_sensitivity_v4.json, sensitivity_{tau,beta}_v4.png
    python benchmarks/tune_sweep.py --repo . validators --tag v4
    python benchmarks/tune_sweep.py seeds --tags v4_seed0 v4_seed1 v4_seed2 --out v4
        # pools sensitivity curves of several seeds' repositories: mean ± sd per value
        # one 16-trial FIFO random sweep: how each label-free criterion ranks the trials

``validators`` runs every trial to the end (no early stopping, so every trial reports every
criterion after the same epochs) and writes ``tune_validators_<tag>.json`` and
``tune_validators_<tag>.csv``: each criterion's Spearman correlation with labeled
target-val oIoU over the trials, and each swept parameter's (a random sweep's sensitivity).

Both searches of ``asha`` draw the same 16 configurations (same seed); they differ only in the
scheduler. Results: ``benchmarks/results/tune_asha.json``, ``tune_sensitivity.json`` (+ PNGs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
TAUS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]  # Fig. 5's range
BETAS = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]  # Fig. 6


def sweep(repo: Path, name: str, sets: list[str]) -> dict:
    out = repo / "bench_tune" / name
    cmd = ["adaseg", "-S", f"tune.name=bench-{name}"]
    for s in sets:
        cmd += ["-S", s]
    cmd += [
        "tune",
        "--data", "data/prepared",
        "--base", "models/source_only",
        "--init", "models/init",
        "--semantics", "semantics",
        "--masks", "masks",
        "--out", str(out / "tune"),
        "--plots", str(out / "plots"),
        "--metrics", str(out / "tune.json"),
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=repo, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "tune.json").read_text())
    table = pd.read_parquet(out / "tune/trials.parquet")
    return {"name": name, "wall_s": round(wall, 1), "summary": summary, "trials": table}


def asha(repo: Path, args) -> None:
    common = [
        "tune.search=random",
        f"tune.num_samples={args.num_samples}",
        f"tune.epochs={args.epochs}",
        f"tune.cpus_per_trial={args.cpus_per_trial}",
    ]
    rows = {}
    for scheduler in ("asha", "fifo"):
        r = sweep(repo, scheduler, [*common, f"tune.scheduler={scheduler}"])
        s = r["summary"]
        rows[scheduler] = {
            "wall_s": r["wall_s"],
            "trials": s["trials"],
            "completed": s["completed"],
            "stopped_early": s["stopped_early"],
            "failed": s["failed"],
            "trial_epochs": s["trial_epochs"],
            "best_val_oiou": s["best_val_oiou"],
            **{k: v for k, v in s.items() if k.startswith("spearman")},
        }
        print(scheduler, rows[scheduler], flush=True)
    rows["settings"] = vars(args) | {"repo": str(repo)}
    rows["epoch_share"] = rows["asha"]["trial_epochs"] / rows["fifo"]["trial_epochs"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_asha.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    compare(repo, args)


def compare(repo: Path, args) -> None:
    """Per trial: what ASHA did with it and where the full (FIFO) run ranks it at the end.

    Both sweeps drew the same configurations in the same order, so row i is one trial in both.
    Adds ``stopped_ranks`` (final FIFO ranks of the trials ASHA stopped) to tune_asha.json.
    """
    a = pd.read_parquet(repo / "bench_tune/asha/tune/trials.parquet")
    f = pd.read_parquet(repo / "bench_tune/fifo/tune/trials.parquet")
    swept = [c for c in a.columns if "." in c]
    if not np.allclose(a[swept].to_numpy(float), f[swept].to_numpy(float)):
        raise SystemExit("the ASHA and FIFO sweeps did not draw the same configurations")
    t = a[["trial_id", "status", "epochs", *swept, "val_oiou"]].rename(
        columns={"status": "asha_status", "epochs": "asha_epochs", "val_oiou": "asha_val_oiou"}
    )
    t["fifo_val_oiou"] = f["val_oiou"]
    t["fifo_rank"] = t["fifo_val_oiou"].rank(ascending=False, method="min").astype(int)
    t.sort_values("fifo_rank").to_csv(RESULTS / "tune_asha_trials.csv", index=False)
    path = RESULTS / "tune_asha.json"
    rows = json.loads(path.read_text())
    rows["stopped_ranks"] = sorted(t.loc[t["asha_status"] != "COMPLETED", "fifo_rank"].tolist())
    rows["fifo_val_oiou_mean_std"] = [t["fifo_val_oiou"].mean(), t["fifo_val_oiou"].std()]
    path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print("ASHA stopped the trials FIFO ranks", rows["stopped_ranks"], flush=True)


def validators(repo: Path, args) -> None:
    from scipy.stats import spearmanr

    from pipelines.sweep_report import UNSUPERVISED

    r = sweep(
        repo,
        f"validators-{args.tag}",
        [
            "tune.search=random",
            "tune.scheduler=fifo",
            f"tune.num_samples={args.num_samples}",
            f"tune.epochs={args.epochs}",
            f"tune.cpus_per_trial={args.cpus_per_trial}",
        ],
    )
    t = r["trials"]
    done = t[t.status == "COMPLETED"]
    swept = [c for c in t.columns if "." in c]

    def rho(col: str) -> float | None:
        ok = done[[col, "val_oiou"]].dropna()
        if len(ok) < 3 or ok[col].nunique() < 2:
            return None
        return round(float(spearmanr(ok[col], ok["val_oiou"])[0]), 3)

    # the criteria's ranking is the tune stage's own (``rank_agreement``, in tune.json)
    ranked = r["summary"]
    out = {
        "wall_s": r["wall_s"],
        "trials": len(t),
        "completed": len(done),
        "val_oiou_mean_std": [float(done.val_oiou.mean()), float(done.val_oiou.std())],
        "spearman_vs_val_oiou": {
            c: round(ranked[f"spearman_{c}_vs_val_oiou"], 3)
            for c in UNSUPERVISED
            if f"spearman_{c}_vs_val_oiou" in ranked
        },
        "params_spearman_vs_val_oiou": {c: rho(c) for c in swept},
        "settings": vars(args) | {"repo": str(repo)},
    }
    name = f"tune_validators_{args.tag}"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    cols = ["trial_id", *swept, "val_oiou", *[c for c in UNSUPERVISED if c in t]]
    t[cols].sort_values("val_oiou", ascending=False).to_csv(RESULTS / f"{name}.csv", index=False)
    print(json.dumps(out, indent=2, default=str), flush=True)


def _plot_curve(key: str, path: Path, curves: dict, mean=None) -> None:
    """Target-val oIoU against one swept param: each of ``curves`` ({label: {value: oIoU}})
    as a line, plus ``mean`` ((xs, means, sds)) as error bars when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    for label, c in curves.items():
        xs = sorted(c)
        ax.plot(
            xs,
            [c[x] for x in xs],
            "o-" if mean is None else "-",
            alpha=1 if mean is None else 0.35,
            label=label,
        )
    if mean is not None:
        ax.errorbar(*mean, fmt="ko-", capsize=3, label="mean ± sd")
        ax.legend(fontsize=6)
    ax.set_xscale("log" if key.endswith("tau") else "linear")
    ax.set_xlabel(key)
    ax.set_ylabel("target val oIoU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sensitivity(repo: Path, args) -> None:
    suffix = "" if args.tag == "default" else f"_{args.tag}"
    path = RESULTS / f"tune_sensitivity{suffix}.json"
    # a grid left empty keeps the curve already measured under this tag
    curves = json.loads(path.read_text()) if path.exists() else {}
    for key, values in (("semantics.tau", args.taus), ("semantics.beta", args.betas)):
        if not values:
            continue
        section, field = key.split(".")
        space = json.dumps({section: {field: {"values": values}}})
        r = sweep(
            repo,
            f"sens-{field}",
            [
                "tune.search=grid",
                "tune.scheduler=fifo",
                "tune.num_samples=1",
                f"tune.epochs={args.epochs}",
                f"tune.cpus_per_trial={args.cpus_per_trial}",
                f"tune.space={space}",
            ],
        )
        t = r["trials"].sort_values(key)
        curves[key] = {
            "values": t[key].tolist(),
            "val_oiou": t["val_oiou"].round(4).tolist(),
            # the label-free criterion recommended for sweeps without target labels
            **({"unsup_im": t["unsup_im"].round(4).tolist()} if "unsup_im" in t else {}),
            "wall_s": r["wall_s"],
        }
        curve = dict(zip(t[key], t["val_oiou"], strict=True))
        _plot_curve(key, RESULTS / f"sensitivity_{field}{suffix}.png", {args.tag: curve})
        curves[key]["settings"] = vars(args) | {"repo": str(repo)}
        path.write_text(json.dumps(curves, indent=2) + "\n")
        print(key, curves[key], flush=True)


def seeds(repo: Path, args) -> None:
    """Pool the sensitivity curves of ``--tags`` (one per seed's repository): per swept value
    measured on every seed, the mean and standard deviation of target-val oIoU, and each
    seed's difference from its own value at the paper's default (paired, so a seed's overall
    level does not hide the curve's shape). Writes ``tune_sensitivity_<out>.json`` and
    ``sensitivity_{tau,beta}_<out>.png`` (each seed's curve and the mean with its spread).
    """
    per_tag = {
        t: json.loads((RESULTS / f"tune_sensitivity_{t}.json").read_text()) for t in args.tags
    }
    pooled = {}
    for key, default in (("semantics.tau", 0.2), ("semantics.beta", 0.5)):
        curves = {
            t: dict(zip(c[key]["values"], c[key]["val_oiou"], strict=True))
            for t, c in per_tag.items()
            if key in c
        }
        if len(curves) < 2:
            continue
        common = sorted(set.intersection(*(set(c) for c in curves.values())))
        if default not in common:
            raise SystemExit(f"{key}: every seed's grid must hold the default {default}")
        rows = []
        for v in common:
            ys = [c[v] for c in curves.values()]
            ds = [c[v] - c[default] for c in curves.values()]
            rows.append(
                {
                    "value": v,
                    "val_oiou_mean": round(float(np.mean(ys)), 4),
                    "val_oiou_std": round(float(np.std(ys, ddof=1)), 4),
                    "delta_vs_default_mean": round(float(np.mean(ds)), 4),
                    "delta_vs_default_std": round(float(np.std(ds, ddof=1)), 4),
                    "per_seed": [round(y, 4) for y in ys],
                }
            )
        pooled[key] = {"default": default, "tags": list(curves), "rows": rows}
        field = key.split(".")[1]
        mean = (common, [r["val_oiou_mean"] for r in rows], [r["val_oiou_std"] for r in rows])
        _plot_curve(key, RESULTS / f"sensitivity_{field}_{args.out}.png", curves, mean)
        print(key, json.dumps(pooled[key], indent=1), flush=True)
    if not pooled:
        raise SystemExit("no swept key is measured under two or more of --tags")
    path = RESULTS / f"tune_sensitivity_{args.out}.json"
    path.write_text(json.dumps(pooled, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["asha", "compare", "sensitivity", "validators", "seeds"])
    p.add_argument("--repo", type=Path, default=Path("."))
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--taus", type=float, nargs="*", default=TAUS, help="sensitivity: tau grid")
    p.add_argument("--betas", type=float, nargs="*", default=BETAS, help="sensitivity: beta grid")
    p.add_argument(
        "--tag", default="default", help="validators, sensitivity: names the result files"
    )
    p.add_argument("--tags", nargs="*", default=[], help="seeds: sensitivity tags to pool")
    p.add_argument("--out", default="seeds", help="seeds: names the pooled result files")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    modes = {
        "asha": asha,
        "compare": compare,
        "sensitivity": sensitivity,
        "validators": validators,
        "seeds": seeds,
    }
    modes[args.what](args.repo.resolve(), args)


if __name__ == "__main__":
    main()
