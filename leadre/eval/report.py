"""The human side of an eval: the Markdown table and the PNG plots of ``metrics.json``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from leadre.artifacts import write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(methods: dict[str, dict[str, float]], ks: list[int]) -> str:
    cols = [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks]
    kmax = max(ks)
    extra = [c for c in (f"coverage@{kmax}", f"diversity@{kmax}", f"novelty@{kmax}",
                         f"ecpm@{kmax}", f"value_hr@{kmax}", "invalid_rate")
             if any(c in m for m in methods.values())]
    head = ["method", *cols, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        lines.append("| " + " | ".join([name, *(_fmt(m.get(c, float("nan"))) for c in cols + extra)])
                     + " |")
    return "\n".join(lines)


def plot(methods: dict[str, dict[str, float]], ks: list[int], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("hr", "ndcg")):
        for name, m in methods.items():
            ax.plot(ks, [m.get(f"{metric}@{k}", np.nan) for k in ks], marker="o", label=name)
        ax.set_xlabel("K")
        ax.set_ylabel(f"{metric.upper()}@K")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out, "metric_vs_k.png"))

    kmax = max(ks)
    bars = [c for c in (f"hr@{kmax}", f"ndcg@{kmax}", f"coverage@{kmax}", f"ecpm@{kmax}")
            if any(c in m for m in methods.values())]
    fig, axes = plt.subplots(1, len(bars), figsize=(3.2 * len(bars), 3.6))
    axes = np.atleast_1d(axes)
    names = list(methods)
    for ax, c in zip(axes, bars):
        ax.bar(range(len(names)), [methods[n].get(c, np.nan) for n in names],
               color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(c)
    fig.tight_layout()
    written.append(_save(fig, out, "comparison.png"))
    return written


def _save(fig, out: str, name: str) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_text(out, name, buf.getvalue())
