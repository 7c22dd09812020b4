"""What a paper-scale profile (``infra/profiles``) needs: one training step's memory, and the
host memory of the pipeline's in-memory splits.

    python benchmarks/paper_profile.py --profiles sda-refcoco gta5-cityscapes --device cpu

Per profile: the params ``adaseg profile`` validates; the task's network as the profile builds
it (ResNet with frozen batch norms, random weights: memory and time do not depend on them) runs
one warm-up and ``--steps`` training steps (forward, the task's supervised loss, backward, Adam)
at the profile's batch size and image size, on ``--device``. Reported: seconds per step, peak
memory (CUDA: the allocator's peak over the measured steps; CPU: the peak rise of the
process's RSS from before the network is built, sampled: weights, Adam state and the steps'
activations in fp32),
and the host memory the training split takes for the dataset's published train-split size, both
ways a stage can hold it (``runtime.data_in_memory``): ``decoded`` (every sample's image, mask,
superpixels and label map as arrays at the profile's image size) and ``encoded`` (the samples as
stored, decoded per batch: measured as the pickled size of such a split, what Ray's object store
holds, on generated samples at the profile's image size whose images are files read by path as
a dataset on disk's are; a label map is embedded at the image size here, at the dataset's own
size in a real conversion). Also the seconds to decode one sample (image from disk, mask,
superpixels) in the encoded path. Writes ``benchmarks/results/paper_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.tasks import make_task  # noqa: E402
from pipelines.cli import profile_overrides  # noqa: E402
from pipelines.common import read_params  # noqa: E402

OUT = ROOT / "benchmarks/results/paper_profile.json"
#: train-split sizes of the releases (REFERENCE-NOTES; RefCOCO unc: expressions of 42,404 refs)
TRAIN_SAMPLES = {"refcoco": 120_624, "gta5": 24_966, "synthia": 9_400, "cityscapes": 2_975}
CITYSCAPES_CLASSES = 19


def split_bytes(size: int, semantic: bool) -> int:
    """Bytes one sample takes in ``SplitArrays``: image (uint8 x 3), mask (bool), superpixels
    (int16), a semantic label map (uint8) for the semantic task."""
    return size * size * (3 + 1 + 2 + (1 if semantic else 0))


def encoded_split(params, n: int = 48) -> tuple[float, float]:
    """``(bytes per sample, decode seconds per sample)`` of an encoded split at the profile's
    image size: ``n`` generated samples, their images written as files and read by path."""
    import pickle
    import tempfile

    import numpy as np
    import pyarrow as pa

    from components.data.dataset import load_split, to_batch
    from components.data.schema import decode_png, write_shard
    from components.data.vocab import Vocab
    from pipelines.prepare import make_rows

    data = params.data.model_copy(update={"dataset": "synthetic", "queries_per_image": 1})
    table = make_rows(data, 0, "source", "train", 0, n)
    with tempfile.TemporaryDirectory() as d:
        folder, names = Path(d) / "source" / "train", []
        folder.mkdir(parents=True)
        for i, png in enumerate(table.column("image_png").to_pylist()):
            # a dataset on disk: a COCO-length file name, the image as a JPEG file
            names.append(f"COCO_train2014_{i:012d}.jpg")
            from PIL import Image

            Image.fromarray(decode_png(png)).save(Path(d) / names[-1], quality=90)
        table = table.set_column(
            table.schema.get_field_index("image_png"), "image_png", pa.array([b""] * n)
        )
        table = table.set_column(
            table.schema.get_field_index("image_path"), "image_path", pa.array(names)
        )
        write_shard(table, folder / "part-00000.parquet")
        vocab = Vocab.build(table.column("query").to_pylist())
        m, semantic = params.model, params.data.task == "semantic"
        split = load_split(
            d, "source", "train", vocab, m.max_words, m.num_superpixels,
            params.data.task, CITYSCAPES_CLASSES if semantic else None,
            image_root=d, size=params.data.image_size, in_memory="encoded",
        )  # fmt: skip
        per_sample = len(pickle.dumps(split)) / n
        start = time.perf_counter()
        to_batch(split, np.arange(n), torch.device("cpu"))
        return per_sample, (time.perf_counter() - start) / n


def batch_for(task, params, b: int, device) -> dict:
    size, cfg = params.data.image_size, params.model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 500, (b, cfg.max_words), generator=g)
    cells = max(1, size // 16)
    sp = torch.arange(cells * cells).view(cells, cells) % cfg.num_superpixels
    sp = sp.repeat_interleave(16, 0).repeat_interleave(16, 1)[:size, :size]
    out = {
        "image": torch.randn(b, 3, size, size, generator=g),
        "tokens": tokens,
        "lengths": torch.full((b,), cfg.max_words),
        "superpixels": sp.expand(b, -1, -1).contiguous(),
        "mask": (torch.rand(b, size, size, generator=g) > 0.7).float(),
    }
    if task.name == "semantic":
        out["label"] = torch.randint(0, task.num_classes, (b, size, size), generator=g)
    return {k: (v if k == "lengths" else v.to(device)) for k, v in out.items()}


def measure(name: str, steps: int, device_name: str) -> dict:
    device = torch.device(device_name)
    params = read_params(str(ROOT / "params.yaml"), profile_overrides(name))
    semantic = params.data.task == "semantic"
    classes = [f"c{i}" for i in range(CITYSCAPES_CLASSES)] if semantic else None
    task = make_task(params.data.task, params.model, classes)
    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss  # before the network: the peak covers weights, Adam, step

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    torch.manual_seed(0)
    net = task.build_network(500).to(device).train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    b = params.pretrain.batch_size
    batch = batch_for(task, params, b, device)

    def step():
        loss = task.supervised_loss(task.forward(net, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: Adam's state exists from here on
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    done.set()
    thread.join()
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else (peak[0] - base) / 2**20
    return {
        "profile": name,
        "device": torch.cuda.get_device_name() if cuda else "cpu (2 cores)",
        "backbone": params.model.backbone,
        "image_size": params.data.image_size,
        "batch": b,
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "seconds_per_step": round(seconds, 2),
        "peak_step_mib": round(peak_mib, 1),
        "peak_kind": "cuda allocator" if cuda else "RSS rise: weights, Adam, steps (fp32)",
        **host_columns(name),
    }


def host_columns(name: str) -> dict:
    """The train split's host memory, decoded and encoded, and the per-sample decode time."""
    params = read_params(str(ROOT / "params.yaml"), profile_overrides(name))
    n_train = TRAIN_SAMPLES[params.data.dataset]
    semantic = params.data.task == "semantic"
    per_sample, decode_s = encoded_split(params)
    return {
        "train_samples": n_train,
        "host_split_gib": round(n_train * split_bytes(params.data.image_size, semantic) / 2**30, 1),
        "encoded_bytes_per_sample": round(per_sample),
        "host_split_encoded_gib": round(n_train * per_sample / 2**30, 2),
        "decode_ms_per_sample": round(1000 * decode_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["sda-refcoco", "gta5-cityscapes"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--host-only",
        action="store_true",
        help="re-measure only the host-memory and decode columns of the saved rows",
    )
    args = ap.parse_args()
    if args.host_only:
        saved = json.loads(OUT.read_text())
        for row in saved["rows"]:
            row.update(host_columns(row["profile"]))
            print(json.dumps(row), flush=True)
        OUT.write_text(json.dumps(saved, indent=1) + "\n")
        return
    # a fresh process per profile: an allocator keeps what an earlier profile freed
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        rows = [pool.apply(measure, (name, args.steps, args.device)) for name in args.profiles]
    for row in rows:
        print(json.dumps(row), flush=True)
    previous = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    keep = [r for r in previous["rows"] if (r["profile"], r["device"]) not in
            {(x["profile"], x["device"]) for x in rows}]  # fmt: skip
    OUT.write_text(json.dumps({"rows": keep + rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
