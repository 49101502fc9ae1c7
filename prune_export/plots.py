"""PNG plots of a plan's ladder and of a sweep report (matplotlib, Agg backend: no display needed).

Every function takes plain numbers (a plan's ladder, a sweep's ``report.json`` dictionary) and writes one PNG;
nothing here runs a model. matplotlib is imported lazily so the rest of the tool starts without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: One colour and marker per sweep series (a method, AutoPrune's position mode, a quantization), the same in
#: every plot. Quantized builds are points, not lines: each sits at its float twin's FLOPs.
STYLE = {
    "dense": {"color": "black", "marker": "*", "label": "dense"},
    "gsop": {"color": "tab:blue", "marker": "o", "label": "GSOP (plan ladder)"},
    "autoprune": {"color": "tab:orange", "marker": "s", "label": "AutoPrune (T)"},
    "autoprune-original": {"color": "tab:red", "marker": "D", "label": "AutoPrune (T), original positions"},
    "fixed": {"color": "tab:green", "marker": "^", "label": "fixed keep schedule"},
    "gsop+autoprune": {"color": "tab:purple", "marker": "P", "label": "GSOP + AutoPrune"},
    "gsop+autoprune-original": {"color": "tab:pink", "marker": "P", "label": "GSOP + AutoPrune, original positions"},
    "gsop+fixed": {"color": "tab:brown", "marker": "X", "label": "GSOP + fixed schedule"},
    "int8": {"color": "tab:gray", "marker": "v", "label": "int8 build", "points": True},
    "int8-weights": {"color": "tab:olive", "marker": "<", "label": "int8-weights build", "points": True},
}
FLOPS_AXIS = "FLOPs ratio (pruned / dense prefill FLOPs)"
DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a temp file, then rename) and close it."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_ladder(path: Path, flops_ratio: Sequence[float], metrics: Sequence[float | None], *,
                metric: str | None = None, baseline: float | None = None, limit: float | None = None,
                marks: Sequence[tuple[int, str]] = (), title: str = "GSOP ladder") -> None:
    """A plan's ladder: FLOPs ratio and search metric after each step (step 0 = dense).

    ``marks`` are ``(steps, label)`` pairs drawn as vertical lines (a budget's selected prefix).
    """
    plt = _pyplot()
    steps = list(range(len(flops_ratio)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, flops_ratio, marker="o", color="tab:blue")
    top.set_ylabel("FLOPs ratio (pruned / dense)")
    top.set_ylim(0, 1.05)
    top.grid(alpha=0.3)
    top.set_title(title)
    metrics = list(metrics)
    if metrics and metrics[0] is None and baseline is not None:
        metrics[0] = baseline  # step 0 is the dense model: its metric is the search's baseline
    known = [(s, m) for s, m in zip(steps, metrics, strict=False) if m is not None]
    if known:
        bottom.plot([s for s, _ in known], [m for _, m in known], marker="o", color="tab:red")
    if baseline is not None:
        bottom.axhline(baseline, color="grey", linestyle=":", label=f"dense baseline {baseline:.4g}")
    values = [m for _, m in known] + ([baseline] if baseline is not None else [])
    span = (max(values) - min(values)) if values else 0.0
    if limit is not None and values and abs(limit - baseline if baseline is not None else limit) > 4 * max(span, 1e-12):
        # A limit far beyond the steps' values would flatten them into a line: say where it is instead.
        bottom.set_title(f"search metric per step (the search's limit, {limit:.4g}, is off this scale)", fontsize=9)
    elif limit is not None:
        bottom.axhline(limit, color="tab:red", linestyle="--", alpha=0.6, label=f"search limit {limit:.4g}")
    bottom.set_ylabel(f"search metric: {metric}" if metric else "search metric")
    bottom.set_xlabel("number of plan steps applied (0 = dense)")
    bottom.xaxis.set_major_locator(_integer_ticks())
    bottom.grid(alpha=0.3)
    for n, label in marks:
        for ax in (top, bottom):
            ax.axvline(n, color="tab:purple", alpha=0.35)
        top.annotate(label, (n, 1.0), rotation=90, fontsize=7, va="top", ha="right", color="tab:purple")
    if not known:
        bottom.text(0.5, 0.5, "the plan records no metric per step", ha="center", transform=bottom.transAxes)
    if baseline is not None or limit is not None:
        bottom.legend(fontsize=8)
    _save(fig, path)


def search_limit(search: dict[str, Any]) -> float | None:
    """The worst metric a plan's search allowed (baseline -/+ its total tolerance), or None when unknown."""
    baseline, total = search.get("baseline"), search.get("tolerance_total")
    if baseline is None or total is None:
        return None
    return baseline - total if search.get("higher_is_better") else baseline + total


def plan_ladder_plot(plan: Any, path: Path, budget: float | None = None) -> None:
    """:func:`plot_ladder` of a :class:`prune_core.plan.Plan` (``budget``: mark the steps it selects)."""
    search = plan.doc.search or {}
    baseline, limit = search.get("baseline"), search_limit(search)
    marks = []
    if budget is not None:
        marks.append((plan.select(budget).num_steps, f"budget {budget:g}"))
    plot_ladder(path, list(plan.ladder), [None] + [s.metric for s in plan.doc.steps], metric=search.get("metric"),
                baseline=baseline, limit=limit, marks=marks,
                title=f"GSOP ladder: {len(plan.steps)} steps down to FLOPs ratio {plan.ladder[-1]:.3f}")


def _series(config: dict[str, Any]) -> str:
    """A report row's plot series (reports written before series existed: the method)."""
    return config.get("series") or config["method"]


def _style(series: str) -> dict[str, Any]:
    return STYLE.get(series, {"color": "tab:cyan", "marker": "h", "label": series})


def _by_method(configs: Sequence[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    """Per series, ``(flops_ratio, value)`` points sorted by FLOPs ratio, each line starting at dense (not the
    quantized builds' series: they are points)."""
    dense = next((c for c in configs if _series(c) == "dense"), None)
    out: dict[str, list[tuple[float, float]]] = {}
    for c in configs:
        if _series(c) == "dense" or c.get(key) is None:
            continue
        out.setdefault(_series(c), []).append((c["flops_ratio"], c[key]))
    for series, points in out.items():
        if dense is not None and dense.get(key) is not None and not _style(series).get("points"):
            points.append((dense["flops_ratio"], dense[key]))
        out[series] = sorted(set(points))
    return out


def plot_fidelity(path: Path, configs: Sequence[dict[str, Any]]) -> None:
    """Accuracy, retention, agreement and first-token KL against FLOPs ratio, one line per method."""
    plt = _pyplot()
    panels = [
        ("accuracy", "accuracy (exact match, fraction of rows)"),
        ("retention", "retention (accuracy / dense accuracy)"),
        ("agreement", "agreement (answers identical to dense, fraction)"),
        ("mean_first_token_kl", "first-token KL(dense || pruned), nats"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    dense = next((c for c in configs if _series(c) == "dense"), None)
    for ax, (key, ylabel) in zip(axes.flat, panels, strict=True):
        lines = _by_method(configs, key)
        for series, points in lines.items():
            style = _style(series)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=style["marker"], color=style["color"],
                    label=style["label"], linestyle="none" if style.get("points") else "-",
                    markersize=9 if style.get("points") else 6)
        if dense is not None and dense.get(key) is not None:
            ax.plot([dense["flops_ratio"]], [dense[key]], linestyle="none", markersize=12, **_marker("dense"))
        if not lines and (dense is None or dense.get(key) is None):
            reason = "dense accuracy is 0: retention is undefined" if key == "retention" else "no values"
            ax.text(0.5, 0.5, reason, ha="center", va="center", transform=ax.transAxes)
        if key != "mean_first_token_kl":
            values = [p[1] for points in lines.values() for p in points]
            values += [dense[key]] if dense is not None and dense.get(key) is not None else []
            # Zoom on the data (a trained model's points crowd the top), never below 0 or above what is there.
            low = max(-0.05, math.floor((min(values, default=0.0) - 0.05) * 10) / 10)
            ax.set_ylim(low, max(1.05, max(values, default=1.0) + 0.05))
        ax.set_xlim(0, 1.05)
        ax.set_xlabel(FLOPS_AXIS)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        ncol = min(len(handles), 4)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
    rows = -(-len(handles) // 4) if handles else 1
    fig.suptitle("What each configuration keeps, against the FLOPs it keeps")
    fig.tight_layout(rect=(0, 0.035 * rows + 0.015, 1, 0.96))
    _save(fig, path)


def _marker(series: str) -> dict[str, Any]:
    style = _style(series)
    return {"marker": style["marker"], "color": style["color"], "label": style["label"]}


def plot_latency(path: Path, configs: Sequence[dict[str, Any]], latency: dict[str, Any]) -> None:
    """Measured TTFT (relative to dense) against the FLOPs ratio of the timed prompt, with the ideal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal: TTFT ratio = FLOPs ratio")
    seen = set()
    for i, c in enumerate(configs):
        lat = c.get("latency")
        if lat is None:
            continue
        style = _style(_series(c))
        label = style["label"] if _series(c) not in seen else None
        seen.add(_series(c))
        ax.plot([lat["flops_ratio"]], [lat["ttft_ratio"]], linestyle="none", marker=style["marker"],
                color=style["color"], markersize=12 if _series(c) == "dense" else 8, label=label)
        ax.annotate(f"{c['name']}\n{lat['ttft_ms']:.0f} ms ({lat['ttft_speedup']:.2f}x)",
                    (lat["flops_ratio"], lat["ttft_ratio"]), textcoords="offset points",
                    xytext=(8, -14 if i % 2 else 4), fontsize=7)  # alternate sides: neighbours do not overlap
    ax.set_xlim(0, 1.1)
    ax.set_ylim(0, max(1.1, max((c["latency"]["ttft_ratio"] for c in configs if c.get("latency")), default=1) + 0.1))
    ax.set_xlabel("FLOPs ratio of the timed prompt (prefill graph, pruned / dense)")
    dense_ms = latency["results"]["dense"]["ttft_ms"]
    ax.set_ylabel(f"TTFT ratio (time to first token / dense's {dense_ms:.1f} ms)")
    ax.set_title(f"Measured time to first token, ONNX Runtime {latency['provider']}, "
                 f"median of {latency['rounds']} interleaved rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)


def plot_visual_tokens(path: Path, curves: dict[str, list[dict[str, Any]]], visual_tokens: int) -> None:
    """AutoPrune's visual tokens entering each layer, a few samples per budget T: the adaptive curves."""
    plt = _pyplot()
    n = len(curves)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, samples) in zip(axes.flat, curves.items(), strict=False):
        for s in samples:
            layers = list(range(len(s["visual_tokens_per_layer"])))
            extra = f", I1 {s['i1']:.2f} bits, k {s['k']:.3f}" if s.get("k") is not None and s.get("i1") is not None else ""
            ax.plot(layers, s["visual_tokens_per_layer"], marker=".", label=f"line {s['line']}{extra}")
        ax.axhline(visual_tokens, color="grey", linestyle=":", label=f"dense ({visual_tokens})")
        ax.set_title(name)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("visual tokens entering the layer")
    fig.suptitle("AutoPrune: each prompt's own schedule (visual tokens per layer)")
    fig.tight_layout()
    _save(fig, path)


def sweep_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Every plot a sweep report has data for, written into ``out``; their file names."""
    written = []
    configs = report["configs"]
    plot_fidelity(out / "fidelity.png", configs)
    written.append("fidelity.png")
    if report.get("latency"):
        plot_latency(out / "latency.png", configs, report["latency"])
        written.append("latency.png")
    ladder = report.get("ladder")
    if ladder:
        marks = list(dict.fromkeys((c["plan_steps"], f"budget {c['budget']:g}") for c in configs
                                   if _series(c) == "gsop"))  # the plan alone, each budget once
        plot_ladder(out / "ladder.png", ladder["flops_ratio"], ladder["metrics"], metric=ladder.get("metric"),
                    baseline=ladder.get("baseline"), limit=ladder.get("limit"), marks=marks)
        written.append("ladder.png")
    if report.get("autoprune_curves"):
        plot_visual_tokens(out / "visual_tokens.png", report["autoprune_curves"], report["visual_tokens"])
        written.append("visual_tokens.png")
    return written
