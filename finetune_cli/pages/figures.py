"""Every figure the tool draws (matplotlib, loaded lazily), and the PNG encodings of heat-map overlays.
"""

from __future__ import annotations

import numpy as np

from finetune_cli.analysis.calibration import ece, reliability
from finetune_cli.analysis.curve import law
from finetune_cli.analysis.units import png_bytes as encoded
from finetune_cli.config import EXPLAIN, ExplainConfig


def overlay_png(image: np.ndarray, heat: np.ndarray, config: ExplainConfig = EXPLAIN) -> bytes:
    """PNG bytes of `heat` (S, S; its positive part scaled to its peak) drawn over `image` (S, S, 3), in the
    'jet' colours, up to `overlay_alpha` opaque at the peak, enlarged to at least `min_view` px (nearest neighbour)."""
    import matplotlib

    peak = float(heat.max())
    scaled = np.clip(heat, 0, None) / peak if peak > 0 else np.zeros_like(heat)
    colours = matplotlib.colormaps["jet"](scaled)[..., :3] * 255
    alpha = config.overlay_alpha * np.sqrt(scaled)[..., None]  # the photo shows through where the map is low
    blended = ((1 - alpha) * image + alpha * colours).clip(0, 255).astype(np.uint8)
    return png_bytes(blended, config.min_view)


def png_bytes(pixels: np.ndarray, min_view: int = EXPLAIN.min_view) -> bytes:
    """uint8 (H, W, 3) as PNG bytes, enlarged by a whole factor (each pixel repeated) to at least `min_view` px wide."""
    pixels = np.asarray(pixels, np.uint8)
    factor = max(1, -(-min_view // pixels.shape[1]))
    return encoded(pixels.repeat(factor, axis=0).repeat(factor, axis=1))


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def curves_figure(history: list[dict]):
    """Loss and accuracy per epoch, or CV accuracy per C for a linear run."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    if history and "C" in history[0]:
        axes[0].semilogx([h["C"] for h in history], [h["cv_accuracy"] for h in history], "o-")
        axes[0].set(xlabel="C (inverse L2 strength)", ylabel="cross-validated accuracy", title="linear head")
        axes[1].axis("off")
    else:
        epochs = [h["epoch"] for h in history]
        for key, axis in (("loss", axes[0]), ("accuracy", axes[1])):
            axis.plot(epochs, [h[key] for h in history], "o-", label="train")
            axis.plot(epochs, [h["val_" + key] for h in history], "o-", label="validation")
            axis.set(xlabel="epoch", title=key)
            axis.legend()
    figure.tight_layout()
    return figure


def learning_curve_figure(record: dict):
    """The learning curve of metrics["learning_curve"]: measured out-of-fold accuracy (95 % bootstrap bars) by
    training images per class, the fitted power law, and the forecast with its intervals; log x axis."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    points, ahead, fit = record["points"], record["forecast"], record["fit"]
    for rows, style, label in ((points, "o", "measured (out-of-fold)"), (ahead, "s", "forecast")):
        n = [r["images_per_class"] for r in rows]
        y = np.array([r["accuracy"] for r in rows])
        bars = np.clip([y - [r["low"] for r in rows], [r["high"] for r in rows] - y], 0, None)
        axis.errorbar(n, y, yerr=bars, fmt=style, capsize=3, label=label)
    span = np.geomspace(points[0]["images_per_class"], ahead[-1]["images_per_class"], 100)
    axis.plot(span, 1 - law(span, fit["a"], fit["b"], fit["c"]), "-", alpha=0.6,
              label=f"fit: error = {fit['a']:.3f} + {fit['b']:.2f} n^-{fit['c']:.2f}")
    axis.set_xscale("log")
    axis.set(xlabel="training images per class (n)", ylabel="accuracy", title="learning curve (linear head)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def lr_figure(rates, losses, smoothed, marks: dict, spread: float | None = None):
    """Loss against learning rate (log x): each step's loss, its smoothed curve, and the suggestions.

    Args:
        rates, losses, smoothed: (n,) the sweep (`train.lr_sweep.LrSweep`).
        marks: suggestion name -> (suggested rate, the step it was read at):
            a marker on the curve at that step and a dashed line at the rate.
        spread: the suggestions' largest / smallest when they disagree (said in the title).
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    axis.semilogx(rates, losses, color="0.75", linewidth=1, label="loss per step")
    axis.semilogx(rates, smoothed, color="C0", label="smoothed")
    for k, (name, (rate, step)) in enumerate(marks.items()):
        colour = f"C{k + 1}"
        axis.plot(rates[step], smoothed[step], "o", color=colour)
        axis.axvline(rate, color=colour, linestyle="--", linewidth=1,
                     label=f"{'minimum/10' if name == 'minimum' else name} {rate:.1e}")
    low, high = min(smoothed), max(smoothed)
    pad = max(high - low, 0.05 * abs(high), 1e-3) * 0.25
    axis.set_ylim(low - pad, high + pad)  # the smoothed curve decides; single noisy steps may leave the frame
    title = "learning-rate sweep" + (f": suggestions disagree by {spread:.0f}x" if spread else "")
    axis.set(xlabel="learning rate (head)", ylabel="training loss", title=title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def reliability_figure(calibration):
    """Reliability diagrams of the validation images, before and after temperature scaling.

    Args:
        calibration: a `calibration.Calibration` (before, after (n, k); labels (n,); bins).

    Each panel: accuracy per equal-width confidence bin (bars; the count of
    images above each), the diagonal of perfect calibration, and the ECE.
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    after = f"after (T = {calibration.temperature:.3g})" if calibration.applied else "after (not applied)"
    for axis, (title, probs) in zip(axes, (("before", calibration.before), (after, calibration.after))):
        table = reliability(probs, calibration.labels, calibration.bins)
        edges, filled = table["edges"], table["count"] > 0
        width = edges[1] - edges[0]
        axis.bar(edges[:-1][filled], table["accuracy"][filled], width=width, align="edge", edgecolor="k",
                 label="accuracy")
        axis.plot(table["confidence"][filled], table["confidence"][filled], "o", color="C3", markersize=4,
                  label="mean confidence")
        for left, top, n in zip(edges[:-1][filled], table["accuracy"][filled], table["count"][filled]):
            axis.text(left + width / 2, top + 0.01, str(n), ha="center", va="bottom", fontsize=7)
        axis.plot([0, 1], [0, 1], "--", color="0.5", linewidth=1)
        score = ece(probs, calibration.labels, calibration.bins)
        axis.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top probability)",
                 title=f"{title}: ECE {score:.1%}")
    axes[0].set_ylabel(f"accuracy ({len(calibration.labels)} validation images)")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def confusion_figure(matrix, classes: list[str]):
    """A labelled confusion matrix (rows: true class, columns: predicted)."""
    import numpy as np

    plt = pyplot()
    side = min(12, 2 + 0.5 * len(classes))
    figure, axis = plt.subplots(figsize=(side, side))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=90)
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title="validation confusion matrix")
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", fontsize=8)
    figure.tight_layout()
    return figure


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pretrain_curves_figure(history: list[dict]):
    """Reconstruction loss per epoch (train and held-out), one panel per phase."""
    plt = pyplot()
    phases = list(dict.fromkeys(h["phase"] for h in history))
    figure, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.5), squeeze=False)
    for axis, phase in zip(axes[0], phases):
        rows = [h for h in history if h["phase"] == phase]
        epochs = [h["epoch"] for h in rows]
        axis.plot(epochs, [h["loss"] for h in rows], "o-", label="train")
        axis.plot(epochs, [h["val_loss"] for h in rows], "o-", label="held-out")
        axis.set(xlabel="epoch", ylabel="mean squared error", title=phase)
        axis.legend()
    figure.tight_layout()
    return figure


def reconstructions_figure(clean, noisy, reconstructed):
    """A grid: held-out inputs, their corrupted versions, and the reconstructions.

    Args:
        clean, noisy: (n, S, S, 3) in [0, 255]; reconstructed: (n, S, S, 3) in [0, 1].
    """
    import numpy as np

    plt = pyplot()
    n = len(clean)
    figure, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    rows = (("input", np.asarray(clean) / 255.0), ("noisy input", np.asarray(noisy) / 255.0),
            ("reconstruction", np.asarray(reconstructed)))
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            axes[r, c].imshow(np.clip(images[c], 0, 1))
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    return figure
