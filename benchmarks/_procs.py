"""Run a command and sample the total resident memory of its whole process tree."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import psutil


def run_measured(cmd: list[str], cwd, env=None, interval: float = 0.5) -> dict:
    """Wall time (s) and peak summed RSS (MiB) of ``cmd`` and every descendant (Ray included)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    return {
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": peak / 2**20,
        "output": out,
    }
