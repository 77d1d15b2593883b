"""Pictures of a run for people: the loss curve and labelled grids of validation images.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display is needed and no
global figure state is shared with anything else running in the process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

LABEL_PADDING = 3  # pixels around a grid label


def save_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | Path,
    *,
    eval_steps: Sequence[int] | None = None,
    eval_losses: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """Training loss against step (and evaluation loss, when given, on the same axes) as a PNG."""
    if len(steps) != len(losses):
        raise ValueError(f"save_loss_curve: {len(steps)} steps for {len(losses)} losses")
    if (eval_steps is None) != (eval_losses is None):
        raise ValueError("save_loss_curve: eval_steps and eval_losses go together")
    if eval_steps is not None and eval_losses is not None and len(eval_steps) != len(eval_losses):
        raise ValueError(f"save_loss_curve: {len(eval_steps)} eval steps for {len(eval_losses)} eval losses")
    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(list(steps), list(losses), linewidth=1, label="training loss")
    if eval_steps is not None and eval_losses is not None:
        axes.plot(list(eval_steps), list(eval_losses), marker="o", markersize=3, label="eval loss")
        axes.legend()
    axes.set(xlabel="step", ylabel="flow-matching loss", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def save_image_grid(
    images: Sequence[tuple[str, Image.Image]],
    path: str | Path,
    *,
    columns: int | None = None,
) -> Path:
    """``(label, image)`` pairs in a grid, each label above its image; cells fit the largest image."""
    if not images:
        raise ValueError("save_image_grid: no images")
    columns = columns or math.ceil(math.sqrt(len(images)))
    if columns < 1:
        raise ValueError(f"save_image_grid: columns must be at least 1, got {columns}")
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = probe.textbbox((0, 0), "Ag", font=font)
    label_height = math.ceil(bottom - top) + 2 * LABEL_PADDING
    cell_width = max(image.width for _, image in images)
    cell_height = max(image.height for _, image in images) + label_height
    canvas = Image.new("RGB", (cell_width * columns, cell_height * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (label, image) in enumerate(images):
        left = (index % columns) * cell_width
        top_edge = (index // columns) * cell_height
        offset_x = (cell_width - image.width) // 2
        canvas.paste(image.convert("RGB"), (left + offset_x, top_edge + label_height))
        text = _fit(label, cell_width - 2 * LABEL_PADDING, draw, font)
        draw.text((left + LABEL_PADDING, top_edge + LABEL_PADDING - top), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _fit(
    label: str, width: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> str:
    """``label``, cut short with an ellipsis when it is wider than the cell."""
    if draw.textlength(label, font=font) <= width:
        return label
    for end in range(len(label), -1, -1):
        text = label[:end].rstrip() + "..."
        if draw.textlength(text, font=font) <= width:
            return text
    return ""
