"""One table from several timed default runs (``stage_times.py --keep``): per run the
source-only / SDA / oracle target-test numbers, the share of the source-only -> oracle gap SDA
closes, the `masks` and `semantics` stages' metrics, wall time and peak memory; groups of runs
(e.g. seeds of one setting) as mean ± sd.

    python benchmarks/sda_runs.py default=v4_seed0:/tmp/v4s0,v4_seed1:/tmp/v4s1 \
        visual09=v4_visual09_seed0:/tmp/v4g1

Each name is a ``benchmarks/results/stage_times_<name>.json``; the repository the run kept
(``:path``, optional) adds its masks / semantics metrics. ``@path`` instead takes a kept
repository as it is now (its ``metrics/eval.json``, e.g. after stages were re-run in it with
newer code), without a timing. Writes benchmarks/results/<--out>.json (default sda_runs.json)
and prints markdown.

``--paired FILE`` (an earlier result of this script, e.g. before a change of schedule): each
group pairs its runs by seed with the same-named group of FILE and adds the per-seed
differences (this run minus FILE's) with their mean ± sd.

    python benchmarks/sda_runs.py --out sda_runs_new --paired sda_runs_old.json \
        default=@/tmp/k0,@/tmp/k1,@/tmp/k2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("source_only", "sda", "oracle")
MASKS = ("classifier_loss", "label_prior_loss", "val_map", "kept_fraction", "oiou_vs_gt")
SEMANTICS = (
    "k_s",
    "k_t",
    "k_u",
    "purity_target",
    "nmi_target",
    "grounded_words",
    "grounding_precision",
    "grounding_threshold",
)


def one_run(item: str) -> dict:
    if item.startswith("@"):  # a kept repository as it is now: no timing
        name = kept = item[1:]
        repo = Path(kept)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        eval_ = json.loads((repo / "metrics" / "eval.json").read_text())
        rec = {"seed": params["seed"], "eval": eval_, "wall_s": None, "peak_pss_mib": None}
        # what the repository ran with, where it differs between the runs paired (--paired)
        rec["setting"] = {
            "data.gap": params["data"]["gap"],
            **{f"{s}.epochs": params[s]["epochs"] for s in ("pretrain", "init", "adapt")},
        }
    else:
        name, _, kept = item.partition(":")
        rec = json.loads((RESULTS / f"stage_times_{name}.json").read_text())
    test = {m: rec["eval"][m]["target_test"] for m in MODELS}
    so, sda, orc = (test[m]["oiou"] for m in MODELS)
    row = {
        "run": name,
        "seed": rec["seed"],
        "overrides": rec.get("overrides", {}),
        **({"setting": rec["setting"]} if "setting" in rec else {}),
        **{f"{m}/{k}": test[m][k] for m in MODELS for k in ("oiou", "miou", "map")},
        "sda/zero_acc": test["sda"].get("zero/acc"),
        "gap_closed": (sda - so) / (orc - so) if orc != so else float("nan"),
        "wall_min": rec["wall_s"] / 60 if rec["wall_s"] is not None else None,
        "peak_pss_gib": rec["peak_pss_mib"] / 1024 if rec["peak_pss_mib"] is not None else None,
    }
    repo = Path(kept) if kept else None
    for stage, keys in (("masks", MASKS), ("semantics", SEMANTICS)):
        path = repo / "metrics" / f"{stage}.json" if repo else None
        if path and path.is_file():
            values = json.loads(path.read_text())
            row.update({f"{stage}/{k}": values.get(k) for k in keys})
    grounding = repo / "semantics" / "word_grounding.json" if repo else None
    if grounding and grounding.is_file():  # word -> [known word, score]
        grounded = json.loads(grounding.read_text())["grounded"]
        row["grounded"] = {u: [g["word"], g["score"]] for u, g in sorted(grounded.items())}
    return row


#: what ``--paired`` differences (target test)
PAIRED = ("sda/oiou", "sda/miou", "sda/map", "source_only/oiou", "oracle/oiou", "gap_closed")


def paired(report: dict, files: list[str]) -> None:
    """Per group, ``paired``: this group's runs minus the same seeds' runs of the same-named
    group in ``files`` (names under benchmarks/results or paths)."""
    base: dict = {}
    for f in files:
        path = Path(f) if Path(f).is_file() else RESULTS / f
        if not path.is_file():
            raise SystemExit(f"--paired: no file {f} (nor {RESULTS / f})")
        for label, group in json.loads(path.read_text()).items():
            if label in base:
                raise SystemExit(f"--paired: group {label!r} in both {base[label][0]} and {f}")
            base[label] = (path.name, group)
    for label, g in report.items():
        if label not in base:
            raise SystemExit(f"--paired: no group {label!r} in {', '.join(files)}")
        name, b = base[label]
        for side, runs in (("this run", g["runs"]), (name, b["runs"])):
            seeds = [r["seed"] for r in runs]
            if len(set(seeds)) < len(seeds):
                raise SystemExit(f"--paired: group {label!r} of {side} repeats a seed: {seeds}")
        by_seed = {r["seed"]: r for r in b["runs"]}
        diffs = [
            {"seed": r["seed"], **{k: r[k] - by_seed[r["seed"]][k] for k in PAIRED}}
            for r in g["runs"]
            if r["seed"] in by_seed
        ]
        if not diffs:
            raise SystemExit(f"--paired: group {label!r} shares no seed with {name}")
        stats = summarise([{k: d[k] for k in PAIRED} for d in diffs])
        unpaired = sorted({r["seed"] for r in g["runs"]} ^ set(by_seed))
        g["paired"] = {
            "with": f"{name}:{label}",
            "per_seed": diffs,
            "mean_sd": stats,
            "unpaired_seeds": unpaired,
        }


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        if all(isinstance(v, int | float) for v in vals):
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[key] = (statistics.fmean(vals), sd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="+", help="label=name[:repo],... (stage_times_<name>.json)")
    ap.add_argument("--out", default="sda_runs", help="result file name (without .json)")
    ap.add_argument("--paired", action="append", default=[], help="earlier result to pair with")
    args = ap.parse_args()
    report = {}
    for group in args.groups:
        label, _, names = group.partition("=")
        rows = [one_run(n) for n in names.split(",")]
        report[label] = {"runs": rows, "mean_sd": summarise(rows)}
    if args.paired:
        paired(report, args.paired)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    cols = [
        "source_only/oiou",
        "sda/oiou",
        "oracle/oiou",
        "gap_closed",
        "source_only/miou",
        "sda/miou",
        "source_only/map",
        "sda/map",
        "masks/val_map",
        "masks/kept_fraction",
        "masks/oiou_vs_gt",
        "wall_min",
    ]
    print("| setting | runs | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for label, g in report.items():
        ms = g["mean_sd"]
        cells = [f"{ms[c][0]:.3f} ± {ms[c][1]:.3f}" if c in ms else "–" for c in cols]
        print(f"| {label} | {len(g['runs'])} | " + " | ".join(cells) + " |")
    for label, g in report.items():
        for r in g["runs"]:
            cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "–" for c in cols]
            print(f"| {label}: {r['run']} | 1 | " + " | ".join(cells) + " |")
    if args.paired:
        print("\n| setting | paired with | seeds | " + " | ".join(f"Δ {k}" for k in PAIRED) + " |")
        print("|---|---|---|" + "---|" * len(PAIRED))
        for label, g in report.items():
            p = g["paired"]
            cells = [
                " / ".join(f"{d[k]:+.3f}" for d in p["per_seed"])
                + f" ({p['mean_sd'][k][0]:+.3f} ± {p['mean_sd'][k][1]:.3f})"
                for k in PAIRED
            ]
            seeds = ", ".join(str(d["seed"]) for d in p["per_seed"])
            print(f"| {label} | {p['with']} | {seeds} | " + " | ".join(cells) + " |")
    for label, g in report.items():  # word grounding of each run (semantics stage)
        for r in g["runs"]:
            if "grounded" in r:
                words = ", ".join(f"{u} -> {k} ({v:.2f})" for u, (k, v) in r["grounded"].items())
                level = r.get("semantics/grounding_threshold")
                at = f" at {level:.3f}" if isinstance(level, float) else ""
                print(f"{label}: {r['run']}: grounded{at}: {words or 'none'}")


if __name__ == "__main__":
    main()
