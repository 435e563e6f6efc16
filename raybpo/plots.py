"""Matplotlib without a screen, and a figure as PNG bytes (stages write them through the run directory).

Every plot gets pyplot from `pyplot()`, the one place the Agg backend is chosen, and writes its figure with
`png_bytes`.
"""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as a PNG (100 dpi), then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()
