"""Training throughput through Ray Train vs the same loop in a bare PyTorch process.

    python benchmarks/throughput.py --data data/prepared --epochs 2 --repeats 3

Both paths run the identical per-epoch work of the `pretrain` stage (train_epoch, validation,
a checkpoint written every epoch) on the same data, model and seed. Reported: samples/s of each
(end to end, i.e. including Ray Train's worker start-up, object-store transfer and checkpoint
persistence) and the ratio. Ray's own start-up (`ray.init`) is measured separately.
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import load_params  # noqa: E402
from components.data.dataset import load_split  # noqa: E402
from components.data.vocab import Vocab  # noqa: E402
from components.models.network import build_model  # noqa: E402
from components.tasks import make_task  # noqa: E402
from components.training import evaluate, make_optimizer, train_epoch  # noqa: E402


def bare(params, train, val, vocab, epochs: int) -> tuple[float, list[float]]:
    """The worker loop without Ray: wall seconds and per-epoch training samples/s."""
    torch.set_num_threads(torch.get_num_threads())
    torch.manual_seed(params.seed)
    t0 = time.perf_counter()
    model = build_model(params.model, len(vocab))
    task = make_task("referring", params.model)
    steps = math.ceil(len(train) / params.pretrain.batch_size)
    opt, sched = make_optimizer(model, params.pretrain, steps * epochs)
    per_epoch = []
    with tempfile.TemporaryDirectory() as d:
        for epoch in range(epochs):
            rng = np.random.default_rng((params.seed, 0, epoch))
            t_epoch = time.perf_counter()
            train_epoch(
                task,
                model,
                opt,
                sched,
                train,
                np.arange(len(train)),
                params.pretrain.batch_size,
                torch.device("cpu"),
                rng,
            )
            per_epoch.append(len(train) / (time.perf_counter() - t_epoch))
            evaluate(model, val, 64, torch.device("cpu"), params.model.empty_threshold)
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()}, Path(d) / "state.pt"
            )
    return time.perf_counter() - t0, per_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml", {"pretrain.epochs": args.epochs})
    data = Path(args.data)
    vocab = Vocab.load(data / "vocab.json")
    m = params.model
    train = load_split(data, "source", "train", vocab, m.max_words, m.num_superpixels)
    val = load_split(data, "source", "val", vocab, m.max_words, m.num_superpixels)
    n = len(train) * args.epochs

    import ray

    from components import train_loop
    from components.runtime import init_ray
    from pipelines import train as train_stage

    t0 = time.perf_counter()
    init_ray(params.runtime)
    ray_init_s = time.perf_counter() - t0
    bare_s, ray_s, bare_epoch, ray_epoch = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        seconds, per_epoch = bare(params, train, val, vocab, args.epochs)
        bare_s.append(seconds)
        bare_epoch += per_epoch
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            state = train_stage.run(params, "pretrain", data, Path(d) / "model")
            ray_s.append(time.perf_counter() - t0)
            train_loop.finish(state)  # a fresh run each repeat, not a resume
            ray_epoch += [row["samples_per_s"] for row in state["history"]]
    ray.shutdown()
    bare_sps = [n / s for s in bare_s]
    ray_sps = [n / s for s in ray_s]
    ratio = [r / b for r, b in zip(ray_sps, bare_sps, strict=True)]
    out = {
        "samples_per_epoch": len(train),
        "epochs": args.epochs,
        "torch_threads": torch.get_num_threads(),
        "bare_samples_per_s": bare_sps,
        "ray_train_samples_per_s": ray_sps,
        "ray_over_bare": ratio,
        "bare_epoch_samples_per_s": bare_epoch,
        "ray_worker_epoch_samples_per_s": ray_epoch,
        "epoch_ray_over_bare": statistics.mean(ray_epoch) / statistics.mean(bare_epoch),
        "ray_init_s": ray_init_s,
    }
    (ROOT / "benchmarks/results/throughput.json").write_text(json.dumps(out, indent=2) + "\n")

    def ms(xs):
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.1f}"

    print(f"bare PyTorch: {ms(bare_sps)} samples/s")
    print(f"Ray Train   : {ms(ray_sps)} samples/s (includes worker start-up, data transfer)")
    print(
        f"ratio       : {statistics.mean(ratio):.3f} ± "
        f"{statistics.stdev(ratio) if len(ratio) > 1 else 0:.3f}; ray.init {ray_init_s:.1f} s"
    )


if __name__ == "__main__":
    main()
