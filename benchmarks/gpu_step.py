"""Training-step throughput of the base network on one GPU: fp32 vs bf16 autocast (``amp``).

The step is the one every training phase runs (forward, multi-scale BCE of Eq. 10, backward,
Adam), on random inputs of the benchmark's shapes, so it needs only torch, numpy and pydantic:

    python benchmarks/gpu_step.py --out benchmarks/results/gpu_step.json

Sizes: the default CPU-sized network (``params.yaml: model``) at 64 px, and a wider one
(hidden 256, widths 64/128/256/512) at 128 px, closer to what a GPU user would train.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import ModelConfig  # noqa: E402
from components.losses import multiscale_bce  # noqa: E402
from components.models.network import build_model  # noqa: E402

CONFIGS = {
    "default-64px": (ModelConfig(), 64),
    "wide-128px": (
        ModelConfig(widths=[64, 128, 256, 512], hidden=256, embed_dim=128, num_superpixels=64),
        128,
    ),
}


def batch(b: int, size: int, cfg: ModelConfig, device):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(b, 3, size, size, generator=g)
    tokens = torch.randint(1, 60, (b, cfg.max_words), generator=g)
    lengths = torch.randint(3, cfg.max_words + 1, (b,), generator=g)
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    # 8x8-pixel blocks stand in for SLIC superpixels
    cells = size // 8
    sp = torch.arange(cells * cells).view(cells, cells) % cfg.num_superpixels
    sp = sp.repeat_interleave(8, 0).repeat_interleave(8, 1).expand(b, -1, -1).contiguous()
    mask = (torch.rand(b, size, size, generator=g) > 0.7).float()
    return [t.to(device) for t in (image, tokens, lengths, sp, mask)]


def measure(name: str, b: int, amp: bool, steps: int, device) -> dict:
    cfg, size = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(cfg, 64).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    image, tokens, lengths, sp, mask = batch(b, size, cfg, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(image, tokens, lengths.cpu(), sp)
            loss = multiscale_bce(out["logits"], out["full_logits"].float(), mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    cuda = device.type == "cuda"
    for _ in range(5):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "config": name,
        "batch": b,
        "amp": amp,
        "samples_per_s": round(b * steps / dt, 1),
        "ms_per_step": round(1000 * dt / steps, 2),
        "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in CONFIGS:
        for b in args.batches:
            for amp in (False, True):
                runs = [measure(name, b, amp, args.steps, device) for _ in range(args.repeats)]
                rates = torch.tensor([r["samples_per_s"] for r in runs])
                row = {
                    **runs[-1],
                    "samples_per_s": round(rates.mean().item(), 1),
                    "samples_per_s_sd": round(rates.std().item(), 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
