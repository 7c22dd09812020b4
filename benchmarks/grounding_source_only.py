"""How much of word grounding's gain needs adaptation: the stage-1 (source-only) model with the
target-only words grounded and nothing trained, on target test.

    python benchmarks/grounding_source_only.py --repos /tmp/v4keep/seed0 /tmp/v4keep/seed1

Per repository (after `dvc repro`): ``semantics.word_grounding: visual`` is run on its stage-1
model as the `semantics` stage runs it (same data, same ``grounding_min_score`` and seed: the
same words), the grounded rows are copied into the model's word table, and the model is
evaluated on the target test split next to the unchanged model. Writes
benchmarks/results/<--out>.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.adaptation.sda.grounding import apply_grounding  # noqa: E402
from components.adaptation.sda.semantics import ground  # noqa: E402
from components.config import load_params  # noqa: E402
from components.data.vocab import Vocab  # noqa: E402
from components.models.network import load_trained  # noqa: E402
from components.stage_io import load_query_split, load_task_split  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from repro_seeds import mean_std  # noqa: E402

METRICS = ("oiou", "miou", "map")


def one(repo: Path) -> dict:
    params = load_params(repo / "params.yaml")
    data = repo / "data/prepared"
    vocab = Vocab.load(data / "vocab.json")
    model, info = load_trained(repo / "models/source_only")
    task = info["task_obj"]
    source = load_query_split(params, data, "source", "train", vocab)
    target = load_query_split(params, data, "target", "train", vocab)
    found = ground(model, source, target, vocab, params)
    grounded = copy.deepcopy(model)
    apply_grounding(grounded, vocab, found.words())
    test = load_task_split(params, data, "target", "test", task, vocab)
    row = {"repo": str(repo), "seed": params.seed, "grounded": found.to_json()["grounded"]}
    for name, net in (("source_only", model), ("source_only_grounded", grounded)):
        preds, scores = task.predict(net, test, params.evaluate.batch_size, torch.device("cpu"))
        metrics = task.metrics(preds, scores, test)
        row[name] = {m: float(metrics[m]) for m in METRICS}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repos", nargs="+", type=Path, required=True)
    ap.add_argument("--out", default="grounding_source_only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [one(r) for r in args.repos]
    summary = {}
    for name in ("source_only", "source_only_grounded"):
        summary[name] = {m: mean_std([r[name][m] for r in rows]) for m in METRICS}
    deltas = [r["source_only_grounded"]["oiou"] - r["source_only"]["oiou"] for r in rows]
    summary["delta_oiou"] = mean_std(deltas)
    out = ROOT / f"benchmarks/results/{args.out}.json"
    out.write_text(json.dumps({"per_seed": rows, "summary": summary}, indent=2) + "\n")
    for r in rows:
        words = ", ".join(f"{u}->{v['word']}" for u, v in r["grounded"].items())
        print(
            f"seed {r['seed']}: oIoU {r['source_only']['oiou']:.3f} -> "
            f"{r['source_only_grounded']['oiou']:.3f} ({words})"
        )
    m, sd = summary["delta_oiou"]
    print(f"delta oIoU {m:+.3f} ± {sd:.3f}")


if __name__ == "__main__":
    main()
