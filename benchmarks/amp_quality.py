"""bfloat16 autocast on the CPU against float32, per seed and as mean ± sd: target-test metrics
of source-only, SDA and the oracle, and the run's wall time.

    for s in 0 1 2; do python benchmarks/stage_times.py --seed $s --tag amp_seed$s \\
        -S pretrain.amp=true -S oracle.amp=true -S init.amp=true -S masks.amp=true \\
        -S adapt.amp=true; done
    python benchmarks/amp_quality.py    # float32 reference: benchmarks/results/repro_seeds.json

Writes benchmarks/results/amp_quality.json and prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("source_only", "sda", "oracle")
KEYS = ("oiou", "miou", "map")


def main() -> None:
    fp32 = {r["seed"]: r for r in json.loads((RESULTS / "repro_seeds.json").read_text())["runs"]}
    amp = {}
    for path in sorted(RESULTS.glob("stage_times_amp_seed*.json")):
        rec = json.loads(path.read_text())
        amp[rec["seed"]] = rec
    seeds = sorted(set(fp32) & set(amp))
    rows, summary = [], {}
    for model in MODELS:
        for key in KEYS:
            a = [amp[s]["eval"][model]["target_test"][key] for s in seeds]
            f = [fp32[s]["eval"][model]["target_test"][key] for s in seeds]
            d = [x - y for x, y in zip(a, f, strict=True)]
            sd = statistics.stdev if len(seeds) > 1 else (lambda _: 0.0)
            summary[f"{model}/{key}"] = {
                "fp32": f,
                "bf16": a,
                "diff_mean": statistics.mean(d),
                "diff_sd": sd(d),
                "fp32_sd_over_seeds": sd(f),
            }
            rows.append(
                f"| {model} | {key} | {statistics.mean(f):.3f} ± {sd(f):.3f} "
                f"| {statistics.mean(a):.3f} ± {sd(a):.3f} "
                f"| {statistics.mean(d):+.3f} ± {sd(d):.3f} "
                f"| {' / '.join(f'{x:+.3f}' for x in d)} |"
            )
    summary["bf16_wall_s"] = {s: amp[s]["wall_s"] for s in seeds}
    out = {"seeds": seeds, "summary": summary}
    (RESULTS / "amp_quality.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"seeds {seeds}, target test\n")
    print("| model | metric | fp32 | bf16 autocast | paired difference | per seed |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
