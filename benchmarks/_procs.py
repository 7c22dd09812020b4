"""Run a command and sample the total memory of its whole process tree.

Two sums: RSS counts a page shared by several processes (Ray's object store, torch libraries)
once per process, so it overstates; PSS (Linux) splits each shared page between its sharers,
so the PSS sum is the tree's real footprint.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import psutil


def run_measured(cmd: list[str], cwd, env=None, interval: float = 0.5) -> dict:
    """Wall time (s), peak summed RSS and PSS (MiB) of ``cmd`` and every descendant (Ray too);
    its output, also line by line with each line's arrival time (``lines``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = peak_pss = 0
    done = threading.Event()

    def sample():
        nonlocal peak, peak_pss
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = pss = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                    with contextlib.suppress(psutil.Error, AttributeError):
                        pss += p.memory_full_info().pss  # AttributeError: no PSS off Linux
                peak, peak_pss = max(peak, total), max(peak_pss, pss)
            except psutil.Error:
                pass
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    lines = []  # (seconds since start, line): when each output line arrived
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
    proc.wait()
    done.set()
    t.join()
    return {
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": peak / 2**20,
        "peak_pss_mib": peak_pss / 2**20,
        "output": "\n".join(text for _, text in lines),
        "lines": lines,
    }
