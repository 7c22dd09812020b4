"""What a finished sweep leaves behind: the trials table, the best params overlay, the
rank agreement of the label-free criteria and the sensitivity plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from components.config import LABEL_FREE_METRICS, TuneConfig
from pipelines.sweep_space import overrides_of

UNSUPERVISED = LABEL_FREE_METRICS


def trials_table(results, tcfg: TuneConfig, keys: list[str]) -> pd.DataFrame:
    """One row per trial: status, epochs run, swept values, last reported metrics."""
    rows = []
    for r in results:
        m = r.metrics or {}
        values = overrides_of(r.config or {})
        epochs = result_epoch(m)
        status = "ERROR" if r.error else ("COMPLETED" if epochs >= tcfg.epochs else "STOPPED")
        row = {
            "trial_id": m.get("trial_id") or Path(r.path).name,  # dirname = trial id
            "status": status,
            "epochs": epochs,
            **({"seed": values["seed"]} if "seed" in values else {}),  # grid repeats
            **{k: values.get(k) for k in keys},
        }
        for name in ("val_oiou", "val_miou", "val_map", *UNSUPERVISED):
            row[name] = float(m[name]) if name in m else float("nan")
        row["objective"] = row[tcfg.metric]
        row["error"] = _error_line(r.error)
        rows.append(row)
    return pd.DataFrame(rows)


def result_epoch(result: dict) -> int:
    """Epochs a trial has trained, from its own reported ``epoch`` (Tune's iteration count
    lags it when a restored trial resumes from a newer checkpoint than Tune recorded)."""
    return int(result.get("epoch") or result.get("training_iteration") or 0)


def last_line(text: str, default: str) -> str:
    """The last non-empty line of an error text, at most 1000 characters (``default`` when
    it has none)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else default)[:1000]


def _error_line(error: BaseException | None) -> str:
    """A failed trial's error in one line ("" when it did not fail)."""
    return "" if error is None else last_line(str(error), type(error).__name__)


def rank_agreement(table: pd.DataFrame) -> dict[str, float]:
    """Spearman correlation of each label-free criterion with labeled target-val oIoU (mIoU on
    the semantic task), over trials that ran every epoch (how well it would rank trials
    without target labels)."""
    from scipy.stats import spearmanr

    done = table[table.status == "COMPLETED"]
    # the headline labeled metric: oIoU on the referring task, mIoU on the semantic task
    ref = "val_oiou" if "val_oiou" in done and done["val_oiou"].notna().any() else "val_miou"
    out = {}
    for name in (n for n in UNSUPERVISED if n in done):
        ok = done[[name, ref]].dropna()
        if len(ok) >= 3 and ok[name].nunique() > 1 and ok[ref].nunique() > 1:
            out[f"spearman_{name}_vs_{ref}"] = float(spearmanr(ok[name], ok[ref])[0])
    return out


def best_params_yaml(best: pd.Series, keys: list[str], tcfg: TuneConfig, sweep: str) -> str:
    overlay: dict[str, dict] = {}
    for key in keys:
        *parents, name = key.split(".")
        node = overlay
        for part in parents:
            node = node.setdefault(part, {})
        value = best[key]
        node[name] = value.item() if hasattr(value, "item") else value
    sets = " ".join(f"-S {k}={_exact(best[k])}" for k in keys)
    header = (
        f"# best trial {best.trial_id} of sweep {sweep}: {tcfg.metric} = {best.objective:.4f}"
        f" after {best.epochs} epochs\n# apply: dvc exp run {sets}\n"
    )
    return header + yaml.safe_dump(overlay, sort_keys=False)


def sensitivity_plots(table: pd.DataFrame, keys: list[str], metric: str, out: Path) -> list[Path]:
    """The objective against each swept value (Fig. 5 / 6 / 10 style): one line per fixed
    setting of the other values when they take few distinct values (a grid), else points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table.status != "ERROR"].dropna(subset=["objective"])
    # repeats of a grid point (tune.num_samples > 1 seeds): their mean
    done = done.groupby(keys, as_index=False, dropna=False)["objective"].mean()
    paths = []
    for key in keys:
        others = [k for k in keys if k != key]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        groups = done.groupby(others, dropna=False) if others else [((), done)]
        if others and len(done) and done[others].drop_duplicates().shape[0] > 8:
            groups = [("all trials", done)]
        for label, g in groups:
            g = g.sort_values(key)
            text = (
                label
                if isinstance(label, str)
                else ", ".join(
                    f"{o.split('.')[-1]}={compact(v)}"
                    for o, v in zip(others, np.atleast_1d(label), strict=False)
                )
            )
            style = "o" if label == "all trials" else "o-"
            ax.plot(g[key], g["objective"], style, ms=4, label=text or None)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key.endswith(("tau", "temperature", "lambda1", "lambda2")) and (done[key] > 0).all():
            ax.set_xscale("log")
        if ax.get_legend_handles_labels()[0] and len(ax.get_legend_handles_labels()[0]) <= 6:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"sensitivity_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def compact(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _exact(v) -> str:
    """A value as ``-S`` needs it: floats in full (rounding could break an ordered pair)."""
    return repr(float(v)) if isinstance(v, float | np.floating) else str(v)
