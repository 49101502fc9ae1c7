"""AutoPrune's arithmetic: complexity signal, retention curve, budget solve, schedule table, TopK, recycling.

AutoPrune (docs/methods.md, section 4) keeps a prompt-dependent number of visual tokens after every
decoder layer ``l >= 1``. The whole schedule hangs on one scalar: the steepness ``k`` of a logistic
retention curve, which falls as the text-to-image mutual information ``I1`` at layer 1 rises (a harder
question spreads attention, so pruning starts earlier and goes on gently). Given ``k``, the curve is scaled
by one factor ``s`` so that the average number of visual tokens per layer equals the budget ``T``.

This module is the single reference for those numbers; it is pure math (torch and the standard library,
no model code) so that calib/, the exporter and the docs compute the same schedule:

* :func:`mutual_information`, :func:`complexity_i0`, :func:`complexity_i1`: the complexity signal;
* :func:`steepness`, :func:`curve`: ``k`` and the retention curve ``r_l``;
* :func:`simulate`, :func:`solve_scale`: the per-layer counts and the budget solve (host-side bisection in the
  reference code);
* :class:`ScheduleTable`: the solve done once at export time over quantised ``k``, so an engine looks the
  schedule up instead of bisecting; :func:`table_distance` says what the quantisation costs;
* :func:`select_topk_preserving_order`, :func:`recycle`: the run-time selection and token recycling
  (DPC-KNN merging of dropped tokens), deterministic; :func:`recycle_tokens` is the merge itself, traceable,
  which the executor (through :func:`recycle`) and the exported graphs (``exporter.baked``) both run.

Counts. With ``N0`` tokens leaving layer 0, layer ``l`` keeps ``K_l = min(ceil((N0-1) * min(1, s*r_l)), N_vis)``
tokens by score and appends ``c_l = merged_count(D_l)`` recycled tokens made from the ``D_l`` it dropped. The
run-time TopK is also capped by the current count, so :func:`simulate` uses ``min(K_l, cur)``. That cap never
binds for ``k >= 0``: the curve is then non-increasing in ``l``, so ``K_l <= K_{l-1} <= cur`` (and
``K_1 <= N0 - 1 < N0``). It is kept as a guard because the literal formula with ``K_l > cur`` would give a
negative drop count and a negative merge count, which has no meaning. Consequently a schedule never grows
back: ``cur`` after a layer is ``K_l + c_l <= cur`` before it, since ``c_l <= D_l``.

Why one file of ~700 lines: it is the single reference of AutoPrune's numbers (signal, curve, solve,
table, selection, recycling), each step feeding the next; calib, the exporter and the engines all read it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import BudgetError, PlanError

if TYPE_CHECKING:
    from .plan import AutoPruneSection

#: Paper defaults (also the defaults of :class:`~prune_core.plan.AutoPruneSection`).
DEFAULT_X0 = 14.9
DEFAULT_K0 = 0.4
DEFAULT_GAMMA = 0.2
DEFAULT_AMPLITUDE = 0.75
DEFAULT_K_STEP = 0.01

#: ``N0 = min(floor(N0_PER_TOKEN * T), N_vis)`` tokens leave layer 0.
N0_PER_TOKEN = 2.5
#: Bisection on the curve's scale ``s``: interval ``[0, SCALE_MAX]``, at most ``MAX_HALVINGS`` steps, stop once
#: the mean is within ``MEAN_TOLERANCE`` of ``T``.
SCALE_MAX = 20.0
MAX_HALVINGS = 200
MEAN_TOLERANCE = 0.01
#: Smoothing constants of the reference MI estimate (added to the denominator, floor of the ratio).
MI_EPS = 1e-6
MI_RATIO_FLOOR = 1e-6
#: DPC-KNN: neighbours used for the local density.
DPC_NEIGHBOURS = 5

#: Added before flooring in :meth:`ScheduleTable.index`, so decimal halves round up despite binary fractions.
INDEX_SLACK = 1e-9

TABLE_FORMAT = "autoprune-schedule-table"
TABLE_VERSION = 1


# -- budget and complexity ---------------------------------------------------------------------------


def n0_for_budget(tokens: float, visual_tokens: int) -> int:
    """Visual tokens kept after layer 0 for the budget ``T``: ``min(floor(2.5*T), N_vis)``.

    Layer 0 keeps more than ``T`` because later layers keep fewer; the mean over layers is what meets ``T``.
    """
    check_tokens(tokens, visual_tokens)
    return min(math.floor(N0_PER_TOKEN * tokens), visual_tokens)


def check_tokens(tokens: float, visual_tokens: int) -> float:
    """Refuse a budget ``T`` that is not a positive number of visual tokens at most ``N_vis``."""
    if visual_tokens < 1:
        raise ValueError(f"visual_tokens must be >= 1, got {visual_tokens}")
    if not (0 < tokens <= visual_tokens) or math.isnan(tokens):
        raise BudgetError(
            f"AutoPrune budget T (tokens.tokens in the plan) must be in (0, {visual_tokens}] visual tokens per "
            f"layer for this model, got {tokens}; set a smaller average token count"
        )
    return tokens


def mutual_information(attn: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-head mutual information (bits) between text rows and visual columns of one layer's attention.

    ``attn`` is post-softmax attention ``[heads, Tx, Nv]`` restricted to text query rows and visual key
    columns, *not* renormalised (mass that went to system or text keys is simply missing). Treating a text
    row as ``x`` (uniform, ``p(x) = 1/Tx``) and the attended visual token as ``y``:
    ``p(x, y) = A[x, y] / Tx``, ``p(y) = sum_x p(x, y)``, and
    ``MI = sum p(x, y) * log2(max(p(x, y) / (p(x) p(y) + 1e-6), 1e-6))``, the reference estimate with its
    smoothing constants. High MI means different text tokens look at different image regions.

    Computed in ``dtype`` (float64 by default, for stability of the small ratios; pass float32 when tracing for
    an engine that has no float64). Returns ``[heads]`` in ``dtype``.
    """
    if attn.dim() != 3:
        raise ValueError(f"attn must be [heads, text_rows, visual_cols], got shape {tuple(attn.shape)}")
    heads, tx, nv = attn.shape
    if tx == 0 or nv == 0:
        raise ValueError(
            f"attn needs at least one text row and one visual column, got shape {tuple(attn.shape)}"
        )
    a = attn.to(dtype)
    p_xy = a / tx
    p_y = p_xy.sum(dim=1, keepdim=True)
    ratio = p_xy / (p_y / tx + MI_EPS)
    return (p_xy * torch.log2(ratio.clamp_min(MI_RATIO_FLOOR))).sum(dim=(1, 2))


def complexity_i0(attn: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``I0``: mean over heads of the MI at layer 0, over *all* visual columns (a 0-d tensor).

    It weighs the text attention in layer 0's token score ``0.3 * I0 * txt_attn + cls_attn``.
    """
    return mutual_information(attn, dtype).mean()


def complexity_i1(attn: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``I1``: sum over heads of the MI at layer 1, over the ``N0`` surviving visual columns (a 0-d tensor).

    The caller slices ``attn`` to the surviving columns. ``I1`` is the complexity signal that sets ``k``.
    """
    return mutual_information(attn, dtype).sum()


def steepness(i1: float, k0: float = DEFAULT_K0, gamma: float = DEFAULT_GAMMA) -> float:
    """The curve's steepness ``k = max(k0 - gamma * I1, 0)``: more mutual information, flatter curve."""
    return max(k0 - gamma * float(i1), 0.0)


def curve(
    k: float, num_layers: int, x0: float = DEFAULT_X0, amplitude: float = DEFAULT_AMPLITUDE
) -> list[float]:
    """Retention curve ``r_l = A / (1 + exp(k * (l - (x0 + k))))`` for layers ``l = 1..L-1``.

    A logistic that starts near ``A`` and falls around layer ``x0 + k``; ``k = 0`` makes it flat at ``A/2``.
    Only ``k >= 0`` is meaningful (:func:`steepness` clamps), and it makes the curve non-increasing.
    """
    _check_k(k)
    if num_layers < 2:
        raise ValueError(
            f"num_layers must be >= 2 (layer 0 plus at least one pruning layer), got {num_layers}"
        )
    out = []
    for layer in range(1, num_layers):
        z = k * (layer - (x0 + k))
        # The same logistic written two ways so exp() never overflows.
        out.append(
            amplitude / (1.0 + math.exp(z)) if z <= 0 else amplitude * math.exp(-z) / (1.0 + math.exp(-z))
        )
    return out


def _check_k(k: float) -> None:
    if not (k >= 0 and math.isfinite(k)):
        raise ValueError(f"steepness k must be finite and >= 0 (k = max(k0 - gamma*I1, 0)), got {k}")


# -- schedule simulation and budget solve -------------------------------------------------------------


def recycle_candidates(dropped: int) -> int:
    """How many of ``D`` dropped tokens are clustered for recycling: ``min(floor(0.3*D) + 1, D)``."""
    if dropped < 0:
        raise ValueError(f"dropped token count must be >= 0, got {dropped}")
    return min((3 * dropped) // 10 + 1, dropped)


def merged_count(dropped: int) -> int:
    """Recycled tokens ``c`` made from ``D`` dropped ones: 0 if ``D == 0``, else
    ``min(floor((floor(0.3*D) + 1) / 10) + 1, floor(0.3*D) + 1)``.

    Roughly one merged token per ten candidates, at least one whenever something was dropped.
    (``(3*D)//10`` is ``floor(0.3*D)`` in exact arithmetic; both agree for every realistic ``D``.)
    """
    if dropped < 0:
        raise ValueError(f"dropped token count must be >= 0, got {dropped}")
    if dropped == 0:
        return 0
    candidates = (3 * dropped) // 10 + 1
    return min(candidates // 10 + 1, candidates)


@dataclass(frozen=True)
class Simulation:
    """Counts of one simulated schedule; per-layer tuples cover layers ``1..L-1``.

    ``keep[i]``: tokens kept by TopK at layer ``i+1`` (``K_l``, capped by the count entering the layer);
    ``merged[i]``: recycled tokens appended there (``c_l``); ``tokens_per_layer``: ``N0`` then the count
    leaving each layer ``1..L-1`` (``K_l + c_l``), ``L`` values whose mean is the budget's measure.
    """

    n0: int
    keep: tuple[int, ...]
    merged: tuple[int, ...]
    tokens_per_layer: tuple[int, ...]

    @property
    def mean(self) -> float:
        """Average visual tokens per layer (what the budget ``T`` constrains)."""
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)


def simulate(s: float, r: Sequence[float], n0: int, visual_tokens: int) -> Simulation:
    """The schedule produced by scale ``s`` on curve ``r``, starting from ``N0`` tokens.

    This is step 4 of AutoPrune in docs/methods.md, section 4.

    ``K_l = min(ceil((N0-1) * min(1, s*r_l)), N_vis)``, capped by the current count as the run-time TopK is
    (never binding for a non-increasing curve, see the module docstring); ``D = cur - K_l``;
    ``c_l = merged_count(D)``; ``cur = K_l + c_l``. Counts are relative to ``N0``, so merged tokens do not
    compound and the schedule is non-increasing.
    """
    if not 1 <= n0 <= visual_tokens:
        raise ValueError(f"n0 must be in [1, visual_tokens={visual_tokens}], got {n0}")
    if s < 0 or math.isnan(s):
        raise ValueError(f"scale s must be >= 0, got {s}")
    cur = n0
    keep: list[int] = []
    merged: list[int] = []
    counts = [n0]
    for r_l in r:
        k_l = min(math.ceil((n0 - 1) * min(1.0, s * r_l)), visual_tokens, cur)
        c_l = merged_count(cur - k_l)
        cur = k_l + c_l
        keep.append(k_l)
        merged.append(c_l)
        counts.append(cur)
    return Simulation(n0=n0, keep=tuple(keep), merged=tuple(merged), tokens_per_layer=tuple(counts))


@dataclass(frozen=True)
class ScheduleSolution:
    """The budget-solved schedule for one steepness ``k``.

    ``scale`` is the ``s`` the bisection kept; ``keep``/``merged`` are ``K_l``/``c_l`` for layers ``1..L-1``;
    ``tokens_per_layer`` holds ``L`` counts (``N0`` first); ``error = |mean - tokens|``, below 0.01 whenever the
    budget is reachable exactly (a multiple of ``1/L``), otherwise the closest the curve gets (``k = 0``).
    """

    k: float
    tokens: float
    scale: float
    n0: int
    keep: tuple[int, ...]
    merged: tuple[int, ...]
    tokens_per_layer: tuple[int, ...]
    mean: float
    error: float

    @classmethod
    def from_simulation(cls, k: float, tokens: float, scale: float, sim: Simulation) -> ScheduleSolution:
        """The solution that a simulation at ``scale`` gives, with its distance from the budget."""
        return cls(
            k=k,
            tokens=tokens,
            scale=scale,
            n0=sim.n0,
            keep=sim.keep,
            merged=sim.merged,
            tokens_per_layer=sim.tokens_per_layer,
            mean=sim.mean,
            error=abs(sim.mean - tokens),
        )

    @property
    def exact(self) -> bool:
        """Whether the mean meets the budget within the solve's tolerance."""
        return self.error < MEAN_TOLERANCE


def solve_scale(
    k: float,
    tokens: float,
    num_layers: int,
    visual_tokens: int,
    x0: float = DEFAULT_X0,
    amplitude: float = DEFAULT_AMPLITUDE,
) -> ScheduleSolution:
    """Find the curve scale ``s`` whose schedule averages ``tokens`` visual tokens per layer.

    Bisection on ``s`` in ``[0, 20]`` (the mean is non-decreasing in ``s``), at most 200 halvings, keeping the
    ``s`` with the smallest ``|mean - T|`` (first one found on ties) and stopping once it is below 0.01. This is
    the host-side step of the reference code; :class:`ScheduleTable` runs it at export time instead.
    """
    n0 = n0_for_budget(tokens, visual_tokens)
    r = curve(k, num_layers, x0, amplitude)
    lo, hi = 0.0, SCALE_MAX
    best_s, best_sim, best_err = 0.0, None, math.inf
    for _ in range(MAX_HALVINGS):
        mid = (lo + hi) / 2
        sim = simulate(mid, r, n0, visual_tokens)
        mean = sim.mean
        err = abs(mean - tokens)
        if err < best_err:
            best_s, best_sim, best_err = mid, sim, err
        if err < MEAN_TOLERANCE:
            break
        if mean < tokens:
            lo = mid
        else:
            hi = mid
    assert best_sim is not None  # MAX_HALVINGS > 0
    return ScheduleSolution.from_simulation(k, tokens, best_s, best_sim)


# -- schedule table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleTable:
    """Budget-solved schedules over quantised ``k``, built once per plan at export time.

    The grid is ``k_i = i * k_step`` for ``i = 0..n`` with the last point being ``k0`` itself (``k`` never
    exceeds ``k0``). An engine computes ``I1``, then ``k``, then the row index ``round(k / k_step)`` and reads
    the per-layer keep counts, instead of running the bisection on the host. Build with :meth:`build` or
    :meth:`for_section`; :meth:`to_dict`/:meth:`from_dict` give a JSON-friendly form (checked on load).
    """

    tokens: float
    num_layers: int
    visual_tokens: int
    x0: float
    k0: float
    amplitude: float
    k_step: float
    entries: tuple[ScheduleSolution, ...]

    @classmethod
    def build(
        cls,
        tokens: float,
        num_layers: int,
        visual_tokens: int,
        x0: float = DEFAULT_X0,
        k0: float = DEFAULT_K0,
        amplitude: float = DEFAULT_AMPLITUDE,
        k_step: float = DEFAULT_K_STEP,
    ) -> ScheduleTable:
        """Solve the budget at every grid point of ``[0, k0]``."""
        entries = tuple(
            solve_scale(k, tokens, num_layers, visual_tokens, x0, amplitude) for k in grid_points(k0, k_step)
        )
        return cls(tokens, num_layers, visual_tokens, x0, k0, amplitude, k_step, entries)

    @classmethod
    def for_section(cls, section: AutoPruneSection, num_layers: int, visual_tokens: int) -> ScheduleTable:
        """The table for a plan's AutoPrune settings on a model with ``num_layers`` and ``visual_tokens``."""
        return cls.build(
            section.tokens,
            num_layers,
            visual_tokens,
            section.x0,
            section.k0,
            section.amplitude,
            section.k_step,
        )

    @property
    def ks(self) -> tuple[float, ...]:
        """The grid of ``k`` values, one per entry."""
        return tuple(e.k for e in self.entries)

    def index(self, k: float) -> int:
        """Row of the grid point nearest to ``k`` (clamped to ``[0, k0]``).

        Halves round up, also when the division lands a hair below one (0.175 / 0.05 = 3.4999999999999996);
        a graph that computes the index itself must use the same rule, or meet a different row at exact halves.
        """
        if math.isnan(k):
            raise ValueError("k is NaN")
        k = min(max(k, 0.0), self.k0)
        return min(math.floor(k / self.k_step + 0.5 + INDEX_SLACK), len(self.entries) - 1)

    def lookup(self, k: float) -> ScheduleSolution:
        """The schedule solved at the grid point nearest to ``k``."""
        return self.entries[self.index(k)]

    def count_ranges(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per-layer ``[min, typical, max]`` of the keep counts and of the merged counts over every row.

        An engine that receives the counts as shape-tensor inputs only ever sees table rows, so these are
        exact value ranges for its optimization profile; the typical vector is the middle row's.
        """
        middle = self.entries[len(self.entries) // 2]

        def ranges(rows: list[tuple[int, ...]], typical: tuple[int, ...]) -> list[list[int]]:
            columns = list(zip(*rows, strict=True))
            return [[min(c) for c in columns], list(typical), [max(c) for c in columns]]

        return (
            ranges([e.keep for e in self.entries], middle.keep),
            ranges([e.merged for e in self.entries], middle.merged),
        )

    def keep_rows(self) -> list[list[int]]:
        """``K_l`` per grid row and layer ``1..L-1``: the constant an exported graph gathers from."""
        return [list(e.keep) for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (plain ints, floats, lists), e.g. for an export manifest."""
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "tokens": self.tokens,
            "num_layers": self.num_layers,
            "visual_tokens": self.visual_tokens,
            "x0": self.x0,
            "k0": self.k0,
            "amplitude": self.amplitude,
            "k_step": self.k_step,
            "entries": [
                {
                    "k": e.k,
                    "scale": e.scale,
                    "keep": list(e.keep),
                    "merged": list(e.merged),
                    "tokens_per_layer": list(e.tokens_per_layer),
                    "mean": e.mean,
                }
                for e in self.entries
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "schedule table") -> ScheduleTable:
        """Read :meth:`to_dict`'s form back, re-simulating every row from its stored scale.

        A row whose counts do not follow from its ``k`` and scale (a hand edit, another version of the
        formulas) is refused: the table would silently disagree with the plan it was built from.
        """
        if data.get("format") != TABLE_FORMAT or data.get("version") != TABLE_VERSION:
            raise PlanError(
                f"{source}: not an AutoPrune schedule table version {TABLE_VERSION} "
                f'(expected "format": "{TABLE_FORMAT}", got {data.get("format")!r} version '
                f"{data.get('version')!r}); rebuild it from the plan"
            )
        try:
            tokens = float(data["tokens"])
            num_layers = int(data["num_layers"])
            visual_tokens = int(data["visual_tokens"])
            x0, k0 = float(data["x0"]), float(data["k0"])
            amplitude, k_step = float(data["amplitude"]), float(data["k_step"])
            rows = list(data["entries"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"{source}: missing or malformed field ({exc!r}); rebuild it from the plan"
            ) from None
        grid = grid_points(k0, k_step)
        if len(rows) != len(grid):
            raise PlanError(
                f"{source}: {len(rows)} entries, but k0={k0} and k_step={k_step} give {len(grid)}; "
                "rebuild it from the plan"
            )
        n0 = n0_for_budget(tokens, visual_tokens)
        entries = []
        for i, (k, row) in enumerate(zip(grid, rows, strict=True)):
            try:
                stored_k, scale = float(row["k"]), float(row["scale"])
                stored = (list(row["keep"]), list(row["merged"]), list(row["tokens_per_layer"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise PlanError(
                    f"{source}: entry {i} is malformed ({exc!r}); rebuild it from the plan"
                ) from None
            sim = simulate(scale, curve(k, num_layers, x0, amplitude), n0, visual_tokens)
            if stored_k != k or stored != (list(sim.keep), list(sim.merged), list(sim.tokens_per_layer)):
                raise PlanError(
                    f"{source}: entry {i} (k={stored_k}) does not match its recomputed schedule "
                    f"(expected k={k}, keep={list(sim.keep)}); rebuild it from the plan"
                )
            entries.append(
                ScheduleSolution.from_simulation(k, tokens, scale, sim)
            )
        return cls(tokens, num_layers, visual_tokens, x0, k0, amplitude, k_step, tuple(entries))


def grid_points(k0: float, k_step: float) -> list[float]:
    """``0, k_step, 2*k_step, ...`` up to ``k0``, ending with ``k0`` itself (rounded to 12 decimals)."""
    if not (k_step > 0 and math.isfinite(k_step)):
        raise ValueError(f"k_step must be > 0, got {k_step}")
    _check_k(k0)
    n = max(0, math.ceil(k0 / k_step - 1e-9))
    return [round(min(i * k_step, k0), 12) for i in range(n + 1)]


@dataclass(frozen=True)
class TableDistance:
    """How far table lookups are from the exact solve over a set of ``k`` values.

    ``max_count_diff``: largest ``|table - exact|`` over layers of ``tokens_per_layer``; ``max_keep_diff``: the
    same for ``K_l``; ``max_mean_diff``: largest difference of the means; ``max_budget_error``: largest
    ``|mean - T|`` of the looked-up schedules; ``worst_k``: where ``max_count_diff`` occurred.
    """

    num_points: int
    max_count_diff: int
    max_keep_diff: int
    max_mean_diff: float
    max_budget_error: float
    worst_k: float


def table_distance(table: ScheduleTable, ks: Iterable[float] | None = None) -> TableDistance:
    """Compare ``table.lookup(k)`` with ``solve_scale(k)`` for each ``k`` (default: every 0.001 on ``[0, k0]``)."""
    if ks is None:
        ks = [round(i * 0.001, 12) for i in range(math.floor(table.k0 / 0.001 + 1e-9) + 1)]
    points = 0
    count_diff, keep_diff, mean_diff, budget_err, worst_k = 0, 0, 0.0, 0.0, 0.0
    for k in ks:
        exact = solve_scale(k, table.tokens, table.num_layers, table.visual_tokens, table.x0, table.amplitude)
        looked = table.lookup(k)
        diff = max(abs(a - b) for a, b in zip(looked.tokens_per_layer, exact.tokens_per_layer, strict=True))
        if diff > count_diff:
            count_diff, worst_k = diff, k
        keep_diff = max(keep_diff, max(abs(a - b) for a, b in zip(looked.keep, exact.keep, strict=True)))
        mean_diff = max(mean_diff, abs(looked.mean - exact.mean))
        budget_err = max(budget_err, looked.error)
        points += 1
    if points == 0:
        raise ValueError("table_distance needs at least one k")
    return TableDistance(points, count_diff, keep_diff, mean_diff, budget_err, worst_k)


# -- run-time selection and recycling ------------------------------------------------------------------


def select_topk_preserving_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores``, in ascending index order (kept tokens keep their order).

    Ties go to the lower index, independent of backend (``torch.topk`` promises no tie order). ``k`` is capped
    at ``len(scores)``, as the run-time TopK is capped by the current count. Returns int64 ``[min(k, n)]``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; an upstream attention is broken")
    k = min(k, scores.shape[0])
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _rank(scores: torch.Tensor, k: Any) -> torch.Tensor:
    """Indices of the ``k`` highest scores, best first; ties go to the lower index.

    Eager: a stable sort (as :func:`select_topk_preserving_order`). Under export: ``TopK`` (ONNX TopK breaks
    ties by the lower index, and torch.onnx has no translation of a stable sort).
    """
    if torch.compiler.is_exporting():
        return _topk(scores, k, largest=True)[1]
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _ascending(indices: torch.Tensor) -> torch.Tensor:
    """Distinct integer indices in ascending order (a TopK of the smallest, whole length)."""
    return _topk(indices, indices.shape[0], largest=False)[0]


def _topk(x: torch.Tensor, k: Any, dim: int = -1, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim, largest, sorted=True)`` as ``(values, indices)``; exported, a TopK with K >= 1.

    ONNX requires a positive K (OpenVINO refuses K = 0; ONNX Runtime takes it), and the counts here can be 0:
    no merged tokens, or one candidate with no neighbour. Under export, ``x`` gets one more element along
    ``dim`` that sorts after every real one (-inf or +inf, the integer extreme for integers; TopK breaks ties
    by the lower index and the pad is last), TopK asks for ``k + 1``, and the last slot is dropped: the same
    values and indices for every ``0 <= k <= x.shape[dim]``. Eager, ``torch.topk`` as it is.
    """
    if not torch.compiler.is_exporting():
        return torch.topk(x, k, dim=dim, largest=largest, sorted=True)
    if x.is_floating_point():
        fill = -math.inf if largest else math.inf
    else:
        info = torch.iinfo(x.dtype)
        fill = info.min if largest else info.max
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    padded = torch.cat([x, x.new_full(pad_shape, fill)], dim=dim)
    values, indices = torch.topk(padded, k + 1, dim=dim, largest=largest, sorted=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def _distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances of the rows of ``x [n, dim]`` divided by ``sqrt(dim)``, in ``x``'s dtype.

    One formula, two spellings of its sum of squares (as :func:`_rank` has two spellings of its sort): eager,
    ``torch.cdist`` without its matrix-product shortcut (the executor's bits since the start); under export,
    subtract, square, sum and square root written out (the nodes the graphs have always had). The two may
    round differently in the last bits, never by more.
    """
    scale = math.sqrt(max(x.shape[1], 1))
    if torch.compiler.is_exporting():
        diff = x.unsqueeze(1) - x.unsqueeze(0)
        # The scale as a tensor of x's dtype: a Python float would be exported as a float32 constant, and
        # in a float64 graph its rounding splits exact ties that the executor keeps (ties: lower index).
        return torch.sqrt((diff * diff).sum(dim=-1)) / x.new_tensor(scale)
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / scale


def _member_sums(members: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``members [c, n] @ x [n, d]`` for a 0/1 ``members``: each cluster's sum of hidden states.

    Eager: a matrix product (the executor's bits since the start). Under export: products and a sum, so the
    graph has no MatMul (the FLOPs census counts MatMuls as decoder work, and this is not).
    """
    if torch.compiler.is_exporting():
        return (members.unsqueeze(2) * x.unsqueeze(0)).sum(dim=1)
    return members @ x


def _dpc_knn(
    x: torch.Tensor, n_clusters: Any, neighbours: int = DPC_NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN on ``x [n, dim]`` in its dtype, traceable: ``(centres, assignment, members)``.

    The one implementation of the clustering (:func:`dpc_knn` and :func:`recycle_tokens` call it). No
    data-dependent branch: ``n = 0``, ``n = 1`` and ``n_clusters = 0`` fall out of the arithmetic (an extra
    column of +inf stands for "no denser point" and "no centre", so no reduction runs over an empty axis).
    ``members [n_clusters, n]`` is the 0/1 cluster membership in ``x``'s dtype.
    """
    n = x.shape[0]
    dist = _distances(x)
    idx = torch.arange(n, device=x.device)
    eye = idx.unsqueeze(1) == idx.unsqueeze(0)
    near = torch.sym_max(torch.sym_min(neighbours, n - 1), 0)
    nearest = _topk(dist.masked_fill(eye, math.inf), near, dim=1, largest=False)[0]
    count = torch.sym_max(near, 1)
    log_rho = -(nearest * nearest).sum(dim=1) / count
    # denser[i, j]: point j is denser than point i (ties broken by index).
    denser = (log_rho.unsqueeze(0) > log_rho.unsqueeze(1)) | (
        (log_rho.unsqueeze(0) == log_rho.unsqueeze(1)) & (idx.unsqueeze(0) < idx.unsqueeze(1))
    )
    inf_column = dist.new_full((n, 1), math.inf)
    delta = torch.cat([dist.masked_fill(~denser, math.inf), inf_column], dim=1).min(dim=1).values
    largest = torch.cat([dist.reshape(-1), dist.new_zeros(1)]).max()  # distances are >= 0
    delta = torch.where(torch.isinf(delta), largest, delta)
    score = log_rho + torch.log(delta)
    centres = _ascending(_rank(score, n_clusters))
    to_centre = dist.index_select(1, centres)  # [n, c]
    own = idx.unsqueeze(1) == centres.unsqueeze(0)  # each centre joins its own cluster
    assignment = torch.argmin(torch.cat([torch.where(own, -1.0, to_centre), inf_column], dim=1), dim=1)
    cluster = torch.arange(centres.shape[0], device=x.device)
    members = (assignment.unsqueeze(0) == cluster.unsqueeze(1)).to(x.dtype)  # [c, n]
    return centres, assignment, members


def dpc_knn(
    points: torch.Tensor, n_clusters: int, neighbours: int = DPC_NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN), deterministic, in float64.

    Distances are Euclidean divided by ``sqrt(dim)`` (as the reference does, so densities do not vanish for
    wide hidden states). Density ``rho_i = exp(-mean squared distance to its min(neighbours, n-1) nearest
    other points)``; ``delta_i`` = distance to the nearest point that is denser (the largest pairwise distance
    for the densest point); centres = the ``n_clusters`` points with the largest ``rho * delta``; every point
    joins its nearest centre and each centre its own cluster. Where the reference breaks ties with random
    noise, this breaks them by index (denser-or-equal-and-lower-index counts as denser; lower index wins a
    tie in score or distance). Ranking uses ``log rho + log delta`` so it survives ``rho`` underflowing.

    Returns ``(centres, assignment)``: centre indices in ascending order, and for each point the position of
    its centre in ``centres``. Checks its arguments, then runs in float64 the clustering that
    :func:`recycle_tokens` merges by.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be [n, dim], got shape {tuple(points.shape)}")
    n = points.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    centres, assignment, _ = _dpc_knn(points.to(torch.float64), n_clusters, neighbours)
    return centres, assignment


def recycle_tokens(candidates: torch.Tensor, n_clusters: Any) -> torch.Tensor:
    """DPC-KNN merge of ``candidates [n, d]`` (ascending original order) into ``n_clusters`` mean tokens.

    The one implementation of recycling after the candidate choice, used by the executor (through
    :func:`recycle`, in float64) and traced into the exported graphs (``exporter.baked``, in the score dtype:
    float64 for ONNX Runtime, float32 for TensorRT): clustering by :func:`_dpc_knn`, then each cluster's plain
    mean. Computed in the candidates' dtype; ``n_clusters`` may be a traced count, and ``n = 0``, ``n = 1``,
    ``n_clusters = 0`` need no branch. Returns ``[n_clusters, d]`` ordered by centre index.
    """
    _, _, members = _dpc_knn(candidates, n_clusters)
    return _member_sums(members, candidates) / members.sum(dim=1, keepdim=True)


def recycle(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    n_candidates: int | None = None,
    n_clusters: int | None = None,
) -> torch.Tensor:
    """Merge the best dropped tokens into ``n_clusters`` recycled tokens (SparseVLM's token recycling).

    ``hidden`` ``[D, d]`` and ``scores`` ``[D]`` are the tokens one layer dropped and their selection scores.
    The top ``n_candidates`` by score (default ``floor(0.3*D)+1``, capped at ``D``) are merged by
    :func:`recycle_tokens` in float64 into ``n_clusters`` tokens (default :func:`merged_count` of ``D``): each
    cluster's mean hidden state, ordered by the original index of its centre: ``[n_clusters, d]`` in
    ``hidden``'s dtype. Deterministic: the same input gives a bitwise-identical output.
    """
    if hidden.dim() != 2 or scores.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [D, d] and scores [D], got {tuple(hidden.shape)} and {tuple(scores.shape)}"
        )
    dropped = hidden.shape[0]
    n_candidates = recycle_candidates(dropped) if n_candidates is None else min(n_candidates, dropped)
    n_clusters = merged_count(dropped) if n_clusters is None else n_clusters
    if n_clusters == 0:
        return hidden.new_zeros((0, hidden.shape[1]))
    if not 1 <= n_clusters <= n_candidates:
        raise ValueError(f"n_clusters must be in [0, n_candidates={n_candidates}], got {n_clusters}")
    chosen = select_topk_preserving_order(scores, n_candidates)
    return recycle_tokens(hidden[chosen].to(torch.float64), n_clusters).to(hidden.dtype)
