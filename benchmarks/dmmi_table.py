"""DMMI's Table 2 layout on the default benchmark: the base network vs DMMI (``model.arch:
dmmi``, with its zero-target sampler), each as source-only, with SDA on top, and oracle, over
the same seeds: one-to-zero Acc, one-to-one / one-to-many / overall oIoU on target test.

    python benchmarks/compare_methods.py --repo <clone, model.arch: dmmi, model.zero_interleave:
        true, compare.methods: [sda], tasks: [referring], cpus_per_run: 1> --seeds 0 1 2
    python benchmarks/dmmi_table.py --base benchmarks/results/cdanet_compare_seeds012_records.json \
        --dmmi benchmarks/results/dmmi_compare_seeds012_records.json

The base network's rows come from a comparison run with the same settings (``cpus_per_run: 1``).
Writes ``benchmarks/results/dmmi_table.{md,json}``: mean +- sd over seeds, and DMMI minus base
paired by seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = [("zero/acc", "one-to-zero Acc"), ("one/oiou", "one-to-one oIoU"),
           ("many/oiou", "one-to-many oIoU"), ("oiou", "overall oIoU")]  # fmt: skip
MODELS = ["source_only", "sda", "oracle"]


def load(path: Path) -> dict:
    out = {}
    for r in json.loads(path.read_text()):
        if r["task"] == "referring" and r["model"] in MODELS:
            out[(r["model"], r["seed"])] = r["metrics"]
    return out


def ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--dmmi", type=Path, required=True)
    args = ap.parse_args()
    base, dmmi = load(args.base), load(args.dmmi)
    seeds = sorted({s for _, s in base} & {s for _, s in dmmi})
    rows, table = [], ["| model | network | " + " | ".join(n for _, n in METRICS) + " |"]
    table.append("|---|---|" + "---|" * len(METRICS))
    for model in MODELS:
        for name, recs in (("base", base), ("DMMI", dmmi)):
            vals = {k: [recs[(model, s)][k] for s in seeds] for k, _ in METRICS}
            rows.append({"model": model, "network": name, "seeds": seeds, **vals})
            table.append(
                f"| {model} | {name} | " + " | ".join(ms(vals[k]) for k, _ in METRICS) + " |"
            )
        diff = {k: [dmmi[(model, s)][k] - base[(model, s)][k] for s in seeds] for k, _ in METRICS}
        rows.append({"model": model, "network": "DMMI - base (paired)", "seeds": seeds, **diff})
        table.append(
            f"| {model} | DMMI − base | " + " | ".join(ms(diff[k]) for k, _ in METRICS) + " |"
        )
    out = ROOT / "benchmarks/results/dmmi_table"
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
