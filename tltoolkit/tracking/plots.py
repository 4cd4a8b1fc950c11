"""Pictures for MLflow: training curves and confusion matrices (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def curves_figure(history: pd.DataFrame, title: str = "") -> plt.Figure:
    """Loss and accuracy per epoch, train and validation; stages (a `stage` column) are marked and shaded.

    Args:
        history: One row per epoch with `loss`, `accuracy`, `val_loss`, `val_accuracy` and optionally `stage`.
        title: Figure title.
    """
    history = history.reset_index(drop=True)
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-o"), (f"val_{metric}", "-s")):
            if key in history:
                ax.plot(x, history[key], style, markersize=3, label=key)
        if "stage" in history:
            starts = history.index[history["stage"] != history["stage"].shift()].tolist()
            for i, start in enumerate(starts):
                end = starts[i + 1] if i + 1 < len(starts) else len(history)
                if i % 2:
                    ax.axvspan(start + 0.5, end + 0.5, color="0.93", zorder=0)
                ax.text(start + 0.6, 1.0, history["stage"][start], transform=ax.get_xaxis_transform(), va="top")
        ax.set_xlim(0.5, len(history) + 0.5)  # Also keeps stage labels inside the axes for one-epoch stages.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # An autoencoder's curves have no accuracy.
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def _plain(text: str) -> str:
    """A class name or path as literal text in a figure (a `$` would start matplotlib's mathtext)."""
    return str(text).replace("$", r"\$")


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str = "") -> plt.Figure:
    """A confusion matrix with counts, true classes as rows."""
    size = max(4.0, 0.45 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    ConfusionMatrixDisplay(matrix, display_labels=[_plain(name)[:40] for name in class_names]).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if len(class_names) > 4 else "horizontal"
    )
    ax.set_title(title)
    return fig


def hyperparameter_importance(trials: pd.DataFrame, objective: str, paths: list[str]) -> pd.Series:
    """How much of the objective's spread each hyperparameter explains, in [0, 1], largest first.

    Numbers: the squared Spearman rank correlation. Anything else (choices, booleans): the share of the objective's
    variance explained by the value's group means (eta squared). A rough guide on few trials, not a test.
    """
    y = pd.to_numeric(trials[objective], errors="coerce")
    scores = {}
    for path in paths:
        if path not in trials or trials[path].nunique(dropna=True) < 2 or y.var() == 0:
            scores[path] = 0.0
            continue
        column = trials[path]
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all() and column.map(lambda v: not isinstance(v, bool)).all():
            scores[path] = float(numeric.corr(y, method="spearman") ** 2)
        else:
            means = y.groupby(column.astype(str)).transform("mean")
            scores[path] = float(((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return pd.Series(scores, dtype=float).fillna(0.0).sort_values(ascending=False)


def search_figure(trials: pd.DataFrame, objective: str, direction: str, paths: list[str], top: int = 3) -> plt.Figure:
    """The objective per trial (with the best so far), and against the `top` most important hyperparameters."""
    trials = trials.reset_index(drop=True)
    y = pd.to_numeric(trials[objective], errors="coerce")
    importance = hyperparameter_importance(trials, objective, paths).head(top)
    fig, axes = plt.subplots(
        1, 1 + len(importance), figsize=(4.5 * (1 + len(importance)), 4), constrained_layout=True, squeeze=False
    )
    ax = axes[0][0]
    order = np.arange(len(trials))
    best = y.cummax() if direction == "max" else y.cummin()
    ax.plot(order, y, "o", label=objective)
    ax.step(order, best, where="post", label="best so far")
    ax.set_xticks(order, trials["trial"].astype(str), rotation=90 if len(order) > 12 else 0)
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    for ax, (path, share) in zip(axes[0][1:], importance.items()):
        column = trials[path]
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all() and column.map(lambda v: not isinstance(v, bool)).all():
            ax.plot(numeric, y, "o")
            positive = (numeric > 0).all() and numeric.max() / max(numeric.min(), 1e-30) >= 100
            if positive:
                ax.set_xscale("log")
        else:
            labels = sorted(column.astype(str).unique())
            ax.plot([labels.index(v) for v in column.astype(str)], y, "o")
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(path)
        ax.set_title(f"explains {share:.0%} of the spread", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Search: {objective} ({direction}) over {len(trials)} trials")
    return fig


def reconstruction_figure(
    images: np.ndarray, noisy: np.ndarray, reconstructed: np.ndarray, title: str = ""
) -> plt.Figure:
    """A grid: inputs (top row), the corrupted inputs the autoencoder saw (middle), its reconstructions (bottom).

    Args:
        images, noisy: `(n, h, w, 3)` pixels in 0-255.
        reconstructed: `(n, h, w, 3)` in [0, 1], as the decoder outputs them.
    """
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n + 1.2, 4.6), squeeze=False, constrained_layout=True)
    rows = (("input", images / 255.0), ("noisy input", noisy / 255.0), ("reconstruction", reconstructed))
    for row, (label, pictures) in enumerate(rows):
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(np.clip(pictures[col], 0.0, 1.0))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label)
    if title:
        fig.suptitle(title)
    return fig


def error_histogram(errors: np.ndarray, threshold: float, title: str = "") -> plt.Figure:
    """Reconstruction errors of the training images, with the anomaly threshold drawn in."""
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    ax.hist(errors, bins=min(50, max(5, len(errors) // 5)), color="0.6")
    ax.axvline(threshold, color="C3", label=f"anomaly threshold {threshold:.4g}")
    ax.set_xlabel("reconstruction error per image")
    ax.set_ylabel("images")
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return fig


def reliability_figure(before: pd.DataFrame, after: pd.DataFrame, temperature: float, ece: tuple[float, float]):
    """Reliability diagram: accuracy against top-1 confidence per bin, before and after temperature scaling."""
    figure, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for table, label, marker in (
        (before, f"as trained (ECE {ece[0]:.3f})", "o"),
        (after, f"temperature {temperature:.2f} (ECE {ece[1]:.3f})", "s"),
    ):
        used = table[table.images > 0]
        ax.plot(used.confidence, used.accuracy, marker=marker, label=label)
    ax.set(
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title="Calibration on the val split",
    )
    ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def top_losses_figure(interpretation, columns: int = 4):
    """The top-loss images in a grid, each titled true / predicted (probability) and its loss."""
    table, images = interpretation.top_losses, interpretation.images
    count = max(1, len(table))
    rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row), image in zip(axes.flat, table.iterrows(), images):
        ax.imshow(image)
        mark = "" if row["true"] == row["predicted"] else "wrong: "
        ax.set_title(
            f"{mark}{_plain(row['true'])[:20]} -> {_plain(row['predicted'])[:20]}\n"
            f"p={row['probability']:.2f}  loss {row['loss']:.2f}",
            fontsize=8,
            color="firebrick" if mark else "black",
        )
    figure.suptitle("Top losses (highest first)", fontsize=10)
    figure.tight_layout()
    return figure


def image_grid(images, captions: list[str], title: str, columns: int = 4, marked=None, side: int = 224):
    """Images in a grid under `title`, each scaled to `side` px with its caption below (in red where `marked`): a
    Pillow image, for galleries of what to look at. Composed with Pillow rather than drawn by matplotlib: a gallery
    of 16 photos takes 20 ms instead of 0.8 s, and the audit writes three."""
    from PIL import Image, ImageDraw, ImageFont

    font, heading = ImageFont.load_default(size=12), ImageFont.load_default(size=15)
    columns = max(1, min(columns, max(1, len(images))))
    rows = max(1, -(-len(images) // columns))
    cell_w, caption_h, top = side + 12, 34, 34
    canvas = Image.new("RGB", (columns * cell_w + 12, top + rows * (side + caption_h + 10)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((12, 9), title, fill="black", font=heading)
    for index, (image, caption) in enumerate(zip(images, captions)):
        row, column = divmod(index, columns)
        x, y = 12 + column * cell_w, top + row * (side + caption_h + 10)
        picture = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
        picture.thumbnail((side, side), Image.Resampling.BILINEAR)
        if picture.width < side // 2:  # Small images (digits at 32 px) are enlarged to be seen.
            picture = picture.resize((side, round(side * picture.height / picture.width)), Image.Resampling.NEAREST)
        canvas.paste(picture, (x + (side - picture.width) // 2, y))
        colour = "firebrick" if marked is not None and marked[index] else "black"
        for line_number, line in enumerate(caption.splitlines()[:2]):
            draw.text((x, y + side + 3 + 15 * line_number), line[:40], fill=colour, font=font)
    if not images:
        draw.text((12, top + 10), "(none)", fill="grey", font=font)
    return canvas


def gradcam_figure(image: np.ndarray, heatmap: np.ndarray, title: str):
    """The image, and the Grad-CAM heat map laid over it."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(5.2, 2.9))
    left.imshow(image)
    right.imshow(image)
    right.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    for ax in (left, right):
        ax.axis("off")
    figure.suptitle(_plain(title), fontsize=8)
    figure.tight_layout()
    return figure


def probe_figure(table: pd.DataFrame, chosen: str, suggestion: str, title: str = "") -> plt.Figure:
    """Val accuracy (and train accuracy) of a linear classifier on the frozen features at each depth; the chosen
    depth marked. `table` is `ProbeResult.table()`."""
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    x = np.arange(len(table))
    ax.plot(x, table["train_accuracy"], "-o", color="0.6", markersize=4, label="train accuracy")
    ax.plot(x, table["val_accuracy"], "-s", markersize=5, label="val accuracy")
    at = int(np.flatnonzero(table["layer"].to_numpy() == chosen)[0])
    ax.axvline(at, color="tab:green", linestyle="--", label=f"chosen: {_plain(chosen)}")
    labels = [
        f"{_plain(layer)}\n(layer {index}, /{reduction})"
        for layer, index, reduction in zip(table["layer"], table["index"], table["reduction"])
    ]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(max(0.0, float(table[["train_accuracy", "val_accuracy"]].min().min()) - 0.05), 1.01)
    ax.set_ylabel("accuracy of a linear probe")
    ax.set_xlabel("depth (frozen features after this layer)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(f"{_plain(title)}\nsuggestion: {suggestion}" if title else f"suggestion: {suggestion}")
    return fig
