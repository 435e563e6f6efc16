"""Matplotlib without a screen, and a figure as PNG bytes (stages write them through the run directory).

Every plot gets its figure from `subplots`, a `matplotlib.figure.Figure` of its own (never pyplot's global
state: stages that run at once plot from threads of one driver), and writes it with `png_bytes`.
"""

from __future__ import annotations

import io
from typing import Any


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """(figure, axes) as `pyplot.subplots` gives them, on a figure no other thread sees."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def png_bytes(fig: Any) -> bytes:
    """The figure as a PNG (100 dpi, Agg)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
