"""The preference chart in the style of the LIMA paper's figure: one horizontal bar per
comparison, split into the shares of wins, ties and losses, each labelled with its percentage."""

import io
from collections.abc import Sequence

from lima_jax import storage

COLORS = {"wins": "#3a7dc9", "ties": "#c9c9c9", "losses": "#e07b39"}
MIN_LABELLED_SHARE = 0.04  # narrower segments get no percentage: the text would not fit


def preference_chart(rows: Sequence[tuple[str, float, float, float]], path: str, title: str,
                     ours: str = "ours") -> None:
    """Write a PNG to `path` with a bar per (label, win share, tie share, loss share)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.6))
    names = {"wins": f"{ours} wins".strip(), "ties": "tie", "losses": f"{ours} loses".strip()}
    labels = [label for label, *_ in rows][::-1]  # first row on top
    left = [0.0] * len(rows)
    for column, key in enumerate(("wins", "ties", "losses"), start=1):
        shares = [row[column] for row in rows][::-1]
        bars = ax.barh(labels, shares, left=left, color=COLORS[key], label=names[key], height=0.6)
        for bar, share in zip(bars, shares):
            if share >= MIN_LABELLED_SHARE:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, f"{share:.0%}",
                        ha="center", va="center", fontsize=9)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(rows) > 1 else -0.35), ncol=3, frameon=False)
    _save(fig, ax, path)


def grade_chart(counts: dict[int, int], path: str, title: str) -> None:
    """Write a PNG of the 1-6 grade distribution (bar heights are shares of the graded answers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = max(sum(counts.values()), 1)
    grades = list(range(1, 7))
    shares = [counts.get(g, 0) / total for g in grades]
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = ax.bar([str(g) for g in grades], shares, color=COLORS["wins"])
    for bar, share in zip(bars, shares):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{share:.0%}", ha="center", va="bottom",
                fontsize=9)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("helpfulness grade")
    ax.set_title(title, fontsize=10)
    _save(fig, ax, path)


def _save(fig, ax, path) -> None:
    """The figure without top and right spines, as a PNG at `path` (local or gs://)."""
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt  # imported by the callers already (Agg chosen there)

    plt.close(fig)
    storage.path(path).write_bytes(buffer.getvalue())
