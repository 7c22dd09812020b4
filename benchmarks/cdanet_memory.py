"""CDANet's peak memory against image size, with the spatial energy map chunked (the default
``adapt.cdanet.chunk``) and whole.

    python benchmarks/cdanet_memory.py [--sizes 64 128 256 384] [--batch 8]

Each (image size, chunk) point is one training step (forward and backward of
``CDANet.step``, semantic task, the default ``params.yaml`` network) in a fresh process; its
peak resident memory (``ru_maxrss``) less that of the same process just before the step is
the step's peak. The energy map has (size / 8)^4 entries per (source, target) pair at the
coarsest decoder level (1/8): 4096^2 x 4 bytes = 64 MiB per pair at 512 px, held for the
backward pass unless chunked. Writes ``benchmarks/results/cdanet_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/cdanet_memory.json"

STEP = """
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, {root!r})
from components.adaptation.base import Upstream
from components.adaptation.cdanet import CDANet
from components.adaptation.configs import CDANetConfig
from components.config import load_params
from components.tasks import make_task

size, batch, chunk = {size}, {batch}, {chunk}
torch.set_num_threads(2)
params = load_params({params!r})
task = make_task("semantic", params.model, ["background", "a", "b", "c"])
net = task.build_network(20)
method = CDANet(net, CDANetConfig(chunk=chunk), task, Upstream())
g = torch.Generator().manual_seed(0)

def batch_of():
    label = torch.randint(0, 4, (batch, size, size), generator=g)
    return {{
        "image": torch.randn(batch, 3, size, size, generator=g),
        "tokens": torch.randint(2, 20, (batch, 5), generator=g),
        "lengths": torch.full((batch,), 5),
        "superpixels": torch.zeros(batch, size, size, dtype=torch.long),
        "mask": (label == 1).float(),
        "label": label,
    }}

src, tgt = batch_of(), batch_of()
tgt.pop("label")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
loss, _ = method.step(src, tgt, g)
loss.backward()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"step_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024,
                  "seconds": seconds}}))
"""


def point(size: int, batch: int, chunk: int) -> dict:
    code = STEP.format(
        root=str(ROOT), size=size, batch=batch, chunk=chunk, params=str(ROOT / "params.yaml")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 384])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from components.adaptation.configs import CDANetConfig

    chunk = CDANetConfig().chunk
    rows = []
    for size in args.sizes:
        positions = (size // 8) ** 2
        for label, c in (("chunked", chunk), ("whole", 10**9)):
            row = {"image_size": size, "positions": positions, "mode": label, "chunk": c}
            row |= point(size, args.batch, c)
            row["energy_map_mib"] = args.batch * positions * min(positions, c) * 4 / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {"batch": args.batch, "torch_threads": 2, "rows": rows}
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
