"""PNG figures a person would rather look at than read: learning curves and parity plots."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r[k]))
            except (TypeError, ValueError):
                vals.append(np.nan)
        out[k] = np.array(vals)
    return out


def _series(m: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(step, value) of the rows where the column ``key`` has a value (absent: an empty cell, or no column), positive
    for the log axis; None when no row has one."""
    if key not in m or "step" not in m:
        return None
    ok = np.isfinite(m["step"]) & np.isfinite(m[key]) & (m[key] > 0)
    return (m["step"][ok], m[key][ok]) if ok.any() else None


def learning_curve(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Training loss and validation energy/force MAE against step (log scale). Only what the CSV has is drawn: a
    column that is missing or empty (a metric absent for want of labels, e.g. no energies) is left out, and a
    panel with nothing to draw says so."""
    m = _read_csv(Path(metrics_csv))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (
            axes[0],
            "loss (eV², eV²/Å²)",
            (("train_loss", "-", None, "train loss"), ("val_loss", "o-", None, "validation loss")),
        ),
        (
            axes[1],
            "validation MAE",
            (
                ("val_forces_mae_mev_per_a", "o-", "C2", "force MAE (meV/Å)"),
                ("val_energy_mae_mev", "s-", "C3", "energy MAE (meV)"),
            ),
        ),
    )
    for ax, ylabel, curves in panels:
        drawn = 0
        for key, style, color, label in curves:
            xy = _series(m, key)
            if xy is None:
                continue
            ax.semilogy(*xy, style, ms=3, color=color, label=label)
            drawn += 1
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "nothing to draw (no values)", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title or "learning curve")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def parity(
    target: np.ndarray, pred: np.ndarray, out_png: str | Path, quantity: str, unit: str, title: str = ""
) -> Path | None:
    """Predicted against reference values with the y = x line, MAE and RMSE in the legend. Pairs whose reference
    is absent (NaN) are left out, and so are non-finite predictions (counted in the panel title); with no pair
    left there is nothing to plot: nothing is written and None is returned."""
    target, pred = np.ravel(np.asarray(target, float)), np.ravel(np.asarray(pred, float))
    if target.shape != pred.shape:
        raise ValueError(f"parity: {target.shape[0]} reference values for {pred.shape[0]} predictions")
    labelled = np.isfinite(target)
    ok = labelled & np.isfinite(pred)
    n_bad_pred = int((labelled & ~ok).sum())
    target, pred = target[ok], pred[ok]
    if not len(target):
        return None
    mae = float(np.mean(np.abs(pred - target)))
    rmse = float(np.sqrt(np.mean((pred - target) ** 2)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    ax = axes[0]
    ax.scatter(target, pred, s=4, alpha=0.4, edgecolors="none")
    lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    note = f"; {n_bad_pred} non-finite predictions not drawn" if n_bad_pred else ""
    ax.set_title(f"MAE {mae:.4g} {unit}, RMSE {rmse:.4g} {unit}{note}", fontsize=10)
    err = pred - target
    lo_e, hi_e = np.quantile(err, [0.001, 0.999]) if len(err) > 100 else (err.min(), err.max())
    axes[1].hist(err, bins=60, range=(float(lo_e), float(hi_e)) if hi_e > lo_e else None, color="C1")
    axes[1].set_xlabel(f"error ({unit}); central 99.8 %")
    axes[1].set_ylabel("count")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title or f"{quantity} parity")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def bar_table(
    labels: Sequence[str],
    values: Sequence[float],
    out_png: str | Path,
    ylabel: str,
    title: str = "",
    reference: dict[str, float] | None = None,
) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(labels) + 2), 4))
    ax.bar(labels, values, color="C0", label="so3lib")
    for i, (name, v) in enumerate((reference or {}).items()):
        ax.axhline(v, color=f"C{i + 1}", ls="--", lw=1, label=name)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
