"""PNG plots for reports (matplotlib, Agg backend).

matplotlib is optional: `available()` says whether plots can be drawn, and the
converter works without it. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import importlib.util

import numpy as np

# Keys the keras_microtune callbacks write into `logs`: scheduled values,
# drawn in their own panel rather than with the metrics.
SCHEDULED = (
    "learning_rate",
    "unfrozen_blocks",
    "activation_clip",
    "distillation_alpha",
    "distillation_temperature",
    "quantization_enabled",
    "ranges_frozen",
    "batch_norm_frozen",
    "sparsity",
    "pruning_step",
    "int8_size_bytes",
    "arena_bytes",
    "fits_target",
)


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> str:
    """Lay out, write and close `fig`; the path written."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: dict, path: str) -> str:
    """Loss and metrics per epoch, with scheduled values in a lower panel."""
    plt = _pyplot()
    metrics = [k for k in history if k not in SCHEDULED and history[k]]
    scheduled = [k for k in history if k in SCHEDULED and history[k]]
    rows = 2 if scheduled else 1
    fig, axes = plt.subplots(
        rows, 1, figsize=(7, 3.2 * rows), sharex=True, squeeze=False
    )
    epochs = np.arange(1, len(next(iter(history.values()), [])) + 1)
    top = axes[0, 0]
    for key in metrics:
        top.plot(epochs, history[key], label=key, marker="o", markersize=3)
    top.set_ylabel("value")
    top.set_title("Training")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    if scheduled:
        bottom = axes[1, 0]
        for key in scheduled:
            values = np.asarray(history[key], "float64")
            finite = values[np.isfinite(values)]
            peak = (np.abs(finite).max() if finite.size else 0.0) or 1.0
            bottom.step(
                epochs, values / peak, where="mid", label=f"{key} (/{peak:.3g})"
            )
        bottom.set_ylabel("scheduled (normalised)")
        bottom.legend(fontsize=8)
        bottom.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
    return _save(plt, fig, path)


def confusion_matrices(matrices: dict, path: str, labels=None) -> str:
    """Confusion matrices side by side, e.g. {"float": cm, "int8 (TFLM)": cm}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 4))
    axes = np.atleast_1d(axes)
    for ax, (title, matrix) in zip(axes, matrices.items()):
        cm = np.asarray(matrix)
        ax.imshow(cm, cmap="Blues")
        names = labels or [str(i) for i in range(len(cm))]
        ax.set_xticks(range(len(cm)), names)
        ax.set_yticks(range(len(cm)), names)
        for (i, j), value in np.ndenumerate(cm):
            color = "white" if value > cm.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
        accuracy = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{title}: accuracy {accuracy:.3f}")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return _save(plt, fig, path)


def memory_over_ops(live_bytes, op_names, arena_bytes, path) -> str:
    """Live activation bytes at each op against the measured arena."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(live_bytes)), 3.6))
    x = np.arange(len(live_bytes))
    ax.bar(x, np.asarray(live_bytes) / 1024, color="#4c72b0", label="live activations")
    if arena_bytes:
        ax.axhline(arena_bytes / 1024, color="#c44e52", ls="--", label="tensor arena")
    ax.set_xticks(x, op_names, rotation=90, fontsize=7)
    ax.set_ylabel("KiB")
    ax.set_title("Memory over the op sequence")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def memory_before_after(before, after, path) -> str:
    """Live activation bytes per op, unpatched above and patched below;
    `before`/`after` are (live_bytes, arena_bytes) pairs."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharey=True)
    for ax, (live, arena), title in zip(
        axes, (before, after), ("without patches", "with patch-based inference")
    ):
        ax.bar(
            np.arange(len(live)),
            np.asarray(live) / 1024,
            color="#4c72b0",
            label="live activations",
        )
        if arena:
            ax.axhline(
                arena / 1024,
                color="#c44e52",
                ls="--",
                label=f"tensor arena {arena / 1024:.1f} KiB",
            )
        ax.set_ylabel("KiB")
        ax.set_title(f"Memory over the op sequence, {title}", fontsize=9)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("op index")
    return _save(plt, fig, path)


def flash_breakdown(rows, path) -> str:
    """Stacked bytes per layer: rows are (layer, {category: bytes})."""
    plt = _pyplot()
    categories = sorted({c for _, parts in rows for c in parts})
    fig, ax = plt.subplots(figsize=(7, max(3, 0.28 * len(rows) + 1)))
    left = np.zeros(len(rows))
    y = np.arange(len(rows))
    for category in categories:
        values = np.array([parts.get(category, 0) for _, parts in rows], "float64")
        ax.barh(y, values / 1024, left=left / 1024, label=category)
        left += values
    ax.set_yticks(y, [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.set_title(f"Flash: {left.sum() / 1024:.1f} KiB by layer")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def layer_errors(rows, path) -> str:
    """SQNR (dB) of each layer's converted output against float, worst first."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(rows) + 1)))
    y = np.arange(len(rows))
    sqnr = np.array([r["sqnr_db"] for r in rows], "float64")
    colors = ["#c44e52" if v < 20 else "#4c72b0" for v in sqnr]
    ax.barh(y, sqnr, color=colors)
    ax.set_yticks(y, [f"{r['layer']} ({r['dtype']})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(20, color="#888888", ls="--", lw=1)
    ax.set_xlabel("SQNR vs float (dB, higher is better; red: below 20 dB)")
    ax.set_title("Per-layer error, worst first")
    return _save(plt, fig, path)
