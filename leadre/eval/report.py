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


def _cell(m: dict[str, Any], c: str) -> str:
    """``0.3120 [0.281, 0.344]`` when the metric has a confidence interval."""
    v = _fmt(m.get(c, float("nan")))
    ci = m.get(f"{c}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(map(math.isnan, ci)):
        v += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return v


def markdown_table(methods: dict[str, dict[str, Any]], ks: list[int]) -> str:
    cols = [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks]
    kmax = max(ks)
    extra = [c for c in (f"coverage@{kmax}", f"diversity@{kmax}", f"novelty@{kmax}",
                         f"ecpm@{kmax}", f"value_hr@{kmax}", "invalid_rate")
             if any(c in m for m in methods.values())]
    head = ["method", *cols, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        lines.append("| " + " | ".join([name, *(_cell(m, c) for c in cols + extra)]) + " |")
    return "\n".join(lines)


def describe(metrics: dict[str, Any]) -> str:
    """What a set of numbers was measured on, in one line: split, users (count and hash),
    whether history items were filtered, the confidence interval."""
    ci = metrics.get("ci")
    parts = [f"split {metrics.get('split')}",
             f"{metrics.get('users')} users (set {metrics.get('users_hash')})",
             "history items filtered from every ranking" if metrics.get("filter_history")
             else "history items not filtered",
             f"{100 * ci['level']:.0f}% CI: {ci['method']}, {ci['resamples']} resamples"
             if ci else "no confidence intervals"]
    return "; ".join(parts)


def markdown_report(metrics: dict[str, Any], ks: list[int], n_active: int) -> str:
    """``report.md``: the header stating how the numbers were measured, then the table."""
    stop = metrics.get("early_stopping") or {}
    filtered = "history filtered" if metrics.get("filter_history") else "history not filtered"
    lines = [f"# Offline evaluation ({metrics.get('split')}, {metrics.get('users')} users, "
             f"{filtered}, full ranking over {n_active} active ads)", "",
             describe(metrics) + ".", ""]
    if stop.get("slice"):
        lines += [f"SASRec early-stopped on {stop['rows']} rows of slice `{stop['slice']}`.", ""]
    lines += [markdown_table(metrics.get("methods", {}), ks), ""]
    lines += differences_table(metrics.get("differences"))
    lines += groups_table(metrics.get("methods", {})) + channel_table(metrics.get("channel"))
    lines += cold_table(metrics.get("methods", {}))
    return "\n".join(lines)


def differences_table(differences: dict[str, dict[str, list[float]]] | None) -> list[str]:
    """Paired differences (method - baseline) with their bootstrap intervals."""
    if not differences:
        return []
    lines = ["## Differences (paired bootstrap over the same users)", "",
             "| difference | hr@10 [95% CI] | ndcg@10 [95% CI] |", "|---|---|---|"]
    for name, d in differences.items():
        cells = [f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for v in d.values()]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines + [""]


def groups_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """HR@10 / NDCG@10 per ad-history group (rows per group in the header)."""
    groups = next((m["groups"] for m in methods.values() if m.get("groups")), None)
    if not groups:
        return []
    head = ["method", *(f"{g} ({v['rows']} rows): hr@10 / ndcg@10" for g, v in groups.items())]
    lines = ["## By ad-history length", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [f"{_fmt(v.get('hr@10'))} / {_fmt(v.get('ndcg@10'))}"
                 for v in (m.get("groups") or {}).values()]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines + [""]


def cold_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Recall / NDCG on cold and on warm targets (the cold-start split, see
    :mod:`leadre.eval.cold`); nothing without the split."""
    first = next((m for m in methods.values() if m.get("cold")), None)
    if first is None:
        return []
    k = next(c.split("@")[1] for c in first["cold"] if c.startswith("recall@"))
    cold_n, warm_n = first["cold"]["targets"], first["warm"]["targets"]
    lines = ["## Cold and warm targets", "",
             f"The cold-start split held some ads out of quantiser training and of every "
             f"training interaction: they appear only as test targets ({cold_n} rows target "
             f"a cold ad, {warm_n} a warm one).", "",
             f"| method | cold ({cold_n} rows): recall@{k} / ndcg@{k} "
             f"| warm ({warm_n} rows): recall@{k} / ndcg@{k} |", "|---|---|---|"]
    for name, m in methods.items():
        if not m.get("cold"):
            continue
        cells = [f"{_fmt(_num(m[g].get(f'recall@{k}')))} / {_fmt(_num(m[g].get(f'ndcg@{k}')))}"
                 for g in ("cold", "warm")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", "ID-only SASRec (`sasrec`) cannot rank an ad it never trained on: a cold "
              "ad is never a positive, so its ID embedding learns nothing that could put it "
              "on top (full-softmax training only ever pushes it down as a negative), and its "
              "cold recall is 0 by construction, up to ties and chance scores among untrained "
              "embeddings; the table shows what it measured. Methods that see the ad's text "
              "or S-ID (LEADRE, `text_sasrec`, the embedding ANN) can score cold ads.", ""]
    return lines


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def channel_table(channel: dict[str, Any] | None) -> list[str]:
    """LEADRE as an extra retrieval channel beside SASRec (see :mod:`leadre.eval.channel`)."""
    if not channel:
        return []
    k, big = channel["k"], 2 * channel["k"]
    merged = f"sasrec@{k}+leadre@{k}"
    cols = ["recall@10", f"recall@{k}", f"recall@{big}", f"coverage@{k}", f"coverage@{big}",
            f"novelty@{k}", f"novelty@{big}"]
    lines = ["## As a retrieval channel", "",
             "| candidates | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name in ("sasrec", "leadre", merged):
        m = channel[name]
        lines.append("| " + " | ".join([name, *(_fmt(m[c]) if c in m else "" for c in cols)])
                     + " |")
    gain = channel[f"incremental_recall@{big}"]
    rel = channel.get(f"relative_gain@{big}")
    ci = channel.get(f"incremental_recall@{big}_ci")
    lines += ["", f"Incremental recall@{big} of the merged channel over SASRec's top-{big}: "
              f"{gain:+.4f}" + (f" ({rel:+.1%})" if rel is not None else "")
              + (f", 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}] (paired bootstrap over users)."
                 if ci else "."), ""]
    return lines


def plot(methods: dict[str, dict[str, Any]], ks: list[int], out: str) -> list[str]:
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
        vals = [methods[n].get(c, np.nan) for n in names]
        cis = [methods[n].get(f"{c}_ci") for n in names]
        yerr = (np.abs(np.array([[v - ci[0], ci[1] - v] for v, ci in zip(vals, cis)]).T)
                if all(isinstance(ci, list) for ci in cis) else None)
        ax.bar(range(len(names)), vals, yerr=yerr, capsize=3,
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
