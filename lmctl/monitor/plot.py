"""The drift plot: token-length histograms and per-document perplexity, reference vs current."""

from __future__ import annotations

import io
from collections.abc import Sequence


def render_png(ref_lengths: Sequence[int], cur_lengths: Sequence[int], ref_ppl: Sequence[float],
               cur_ppl: Sequence[float], title: str) -> bytes:
    """Two panels as PNG bytes (rendered in memory, so the file can be written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render off-screen only
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    _histograms(left, np.asarray(ref_lengths, float), np.asarray(cur_lengths, float), log=False)
    left.set_xlabel("tokens per document")
    left.set_title("token length")
    ref_p, cur_p = np.asarray(ref_ppl, float), np.asarray(cur_ppl, float)
    # per-document perplexity can span orders of magnitude on drifted data: then log-spaced bins
    wide = max(ref_p.max(), cur_p.max()) > 10 * max(min(ref_p.min(), cur_p.min()), 1e-9)
    _histograms(right, ref_p, cur_p, log=wide)
    if wide:
        right.set_xscale("log")
    right.set_xlabel("perplexity per document")
    right.set_title("perplexity")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _histograms(ax, ref, cur, log: bool) -> None:  # type: ignore[no-untyped-def]
    """Reference and current on shared bins, as densities, so sets of different sizes compare."""
    import numpy as np

    low, high = float(min(ref.min(), cur.min())), float(max(ref.max(), cur.max()))
    if high <= low:
        high = low + 1
    bins = np.geomspace(max(low, 1e-9), high, 31) if log else np.linspace(low, high, 31)
    ax.hist(ref, bins=bins, density=True, alpha=0.55, label=f"reference (n={len(ref)})")
    ax.hist(cur, bins=bins, density=True, alpha=0.55, label=f"current (n={len(cur)})")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
