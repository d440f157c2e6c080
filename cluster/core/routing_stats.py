"""Routing statistics of a trace, and a fit of the synthetic generator to them (issue 14).

What decides whether prefill statistics predict decode routing, per layer and sequence,
averaged (the statistics measured on real Qwen1.5-MoE and Qwen3.6 captures,
:data:`cluster.core.spec.ROUTING_PRESETS`):

- ``prefill_top10/25/50``: share of the decode's activations that fall on the prefill's 10% /
  25% / 50% most used experts (ties at the cut count fractionally: the expectation over a
  random tie-break, so a short prefill with many equal counts is not favoured by id order);
- ``decode_top10``: share of the decode's activations on its own 10% most used experts;
- ``coverage``: fraction of the experts the decode uses at least once;
- ``reuse``: share of a decode token's experts that the previous token also chose at that
  layer (independent uniform routing gives ``k / E``);
- not in the issue's table, used by the fit to tell a walk (``drift``) from a jump at the
  decode (``drift_jump``): ``halves25``, share of the second half of the decode window's
  activations on the first half's 25% most used experts; ``late25``, share of the second
  half on the prefill's top 25% (a walk keeps departing, a jump does not);
  ``prefill_halves25``, the same between the two halves of the prefill (a walk moves inside
  the prompt too). A prefill of one token gives NaN there, left out of the fit.

The decode is the first ``window`` (128) positions after the prompt. :func:`fit` searches the
generator's ``alpha``, ``reuse``, ``drift`` and ``drift_jump`` (:mod:`cluster.core.routing`) so
that a synthetic trace of the same shape has the target's statistics: a coarse grid, then
Nelder-Mead, on common random numbers (one seed for every candidate, so the objective is a
deterministic function of the parameters). ``drift_share`` is given, not fitted: how much of
the popularity is a sequence's own rather than the domain's shows across sequences (what one
prompt's hot experts tell about another's), not in one sequence's statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.core.errors import RoutingError

STATS = ("prefill_top10", "prefill_top25", "prefill_top50", "decode_top10", "coverage", "reuse",
         "halves25", "late25", "prefill_halves25")
LABELS = {
    "prefill_top10": "decode share on the prefill's top-10% experts",
    "prefill_top25": "decode share on the prefill's top-25% experts",
    "prefill_top50": "decode share on the prefill's top-50% experts",
    "decode_top10": "decode share on its own top-10% experts",
    "coverage": "decode: fraction of experts used at least once",
    "reuse": "same-layer reuse (expert of token t also at t-1)",
    "halves25": "decode 2nd half on the 1st half's top-25% (fit only)",
    "late25": "decode 2nd half on the prefill's top-25% (fit only)",
    "prefill_halves25": "prefill 2nd half on its 1st half's top-25% (fit only)",
}
WINDOW = 128
PARAMS = ("alpha", "reuse", "drift", "drift_jump")


@dataclass(frozen=True)
class RoutingStats:
    """Statistics of one trace. ``values``: name -> mean; ``per_layer``: name -> [L] means over
    sequences; ``share_curve``: [L, 101] decode share on the prefill's top x% (x = 0..100);
    ``coverage_curve``: [L, W] experts used at least once after 1..W decode tokens."""

    values: dict[str, float]
    per_layer: dict[str, np.ndarray]
    share_curve: np.ndarray
    coverage_curve: np.ndarray
    sequences: int
    prompt_tokens: int
    decode_tokens: int
    num_layers: int
    num_experts: int
    top_k: int

    @property
    def uniform_reuse(self) -> float:
        return self.top_k / self.num_experts


def _counts(ids: np.ndarray, E: int) -> np.ndarray:
    """``ids[B, T, L, k]`` -> counts ``[B, L, E]``."""
    B, _, L, _ = ids.shape
    flat = (np.arange(B)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * E + ids
    return np.bincount(flat.ravel(), minlength=B * L * E).reshape(B, L, E).astype(np.float64)


def top_share(rank_by: np.ndarray, values: np.ndarray, q: float) -> np.ndarray:
    """Share of ``values`` on the top ``q`` fraction of experts by ``rank_by`` (both ``[..., E]``).

    ``q * E`` experts, possibly fractional; experts tied at the cut count with the weight
    that fills it (the expectation over a random tie-break). Rows with no values give NaN.
    """
    E = rank_by.shape[-1]
    m = q * E
    if m <= 0:
        return np.zeros(rank_by.shape[:-1])
    srt = -np.sort(-rank_by, axis=-1)
    cut = srt[..., min(E, int(np.ceil(m))) - 1][..., None]
    above = rank_by > cut
    tied = rank_by == cut
    fill = (m - above.sum(-1, keepdims=True)) / np.maximum(tied.sum(-1, keepdims=True), 1)
    w = above + tied * fill
    tot = values.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * values).sum(-1) / tot


def measure(ids: np.ndarray, prompt_tokens: int, num_experts: int,
            window: int = WINDOW) -> RoutingStats:
    """Statistics of ``ids[sequences, positions, layers, k]`` with the first ``prompt_tokens``
    positions as the prefill and the next ``window`` (at most) as the decode."""
    ids = np.asarray(ids)
    B, S, L, k = ids.shape
    P, E = prompt_tokens, num_experts
    if not 1 <= P <= S - 2:
        raise RoutingError(f"prompt_tokens = {P} leaves no decode of 2+ tokens in a trace of "
                           f"{S} positions per sequence: use 1..{S - 2}")
    dec = ids[:, P:P + window]
    W = dec.shape[1]
    cp, cd = _counts(ids[:, :P], E), _counts(dec, E)  # [B, L, E]
    per: dict[str, np.ndarray] = {}
    for q, name in ((0.1, "prefill_top10"), (0.25, "prefill_top25"), (0.5, "prefill_top50")):
        per[name] = top_share(cp, cd, q)
    per["decode_top10"] = top_share(cd, cd, 0.1)
    per["coverage"] = (cd > 0).mean(-1)
    same = (dec[:, 1:, :, :, None] == dec[:, :-1, :, None, :]).any(-1).sum(-1)  # [B, W-1, L]
    per["reuse"] = same.mean(1) / k
    h = W // 2
    late = _counts(dec[:, h:], E)
    per["halves25"] = top_share(_counts(dec[:, :h], E), late, 0.25)
    per["late25"] = top_share(cp, late, 0.25)
    hp = max(1, P // 2)
    per["prefill_halves25"] = top_share(_counts(ids[:, :hp], E), _counts(ids[:, hp:P], E), 0.25)
    with warnings.catch_warnings():  # a statistic without data (a 1-token prefill) is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_layer = {n: np.nanmean(v, axis=0) for n, v in per.items()}
        values = {n: float(np.nanmean(v)) for n, v in per_layer.items()}
        xs = np.linspace(0, 1, 101)
        curve = np.stack([np.nanmean(top_share(cp, cd, x), axis=0) for x in xs], axis=1)  # [L, 101]
    first = np.full((B, L, E), W, dtype=np.int64)
    pos = np.broadcast_to(np.arange(W)[None, :, None, None], dec.shape)
    bl = (np.arange(B)[:, None, None, None] * L + np.arange(L)[None, None, :, None])
    np.minimum.at(first.reshape(-1), (bl * E + dec).ravel(), pos.ravel())
    cov = (first[..., None] < np.arange(1, W + 1)).mean(2).mean(0)  # [L, W]
    return RoutingStats(values, per_layer, curve, cov, B, P, W, L, E, k)


# --- reading any trace ----------------------------------------------------------------------

def read_ids(path: str | Path, num_experts: int | None = None) -> tuple[np.ndarray, int]:
    """``topk_ids`` of an npz trace as ``[sequences, positions, layers, k]`` (a 3-d trace is one
    sequence) and its expert count (``num_experts``, or the largest id + 1), checked."""
    from cluster.core.routing import read_topk_ids

    p = Path(path)
    _data, ids = read_topk_ids(p)
    if ids.ndim == 3:
        ids = ids[None]
    if ids.ndim != 4 or 0 in ids.shape:
        raise RoutingError(f"routing trace {str(p)!r}: topk_ids has shape {list(ids.shape)}; "
                           "expected [tokens, layers, k] or [sequences, positions, layers, k]")
    lo, hi = int(ids.min()), int(ids.max())
    E = num_experts if num_experts is not None else hi + 1
    if lo < 0 or hi >= E:
        raise RoutingError(f"routing trace {str(p)!r} has expert ids in {lo}..{hi}, outside "
                           f"0..{E - 1} (--experts {E})")
    srt = np.sort(ids, axis=-1)
    if (srt[..., 1:] == srt[..., :-1]).any():
        raise RoutingError(f"routing trace {str(p)!r} lists one expert twice for a token")
    return ids.astype(np.int64), E


# --- the generator, and fitting it -------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What a synthetic trace must look like to compare with a target trace."""

    sequences: int
    prompt_tokens: int
    decode_tokens: int
    num_layers: int
    num_experts: int
    top_k: int


def shape_of(st: RoutingStats) -> Shape:
    return Shape(st.sequences, st.prompt_tokens, st.decode_tokens, st.num_layers,
                 st.num_experts, st.top_k)


DEFAULT_SHARE = 1.0


def simulate(shape: Shape, params: dict[str, float], seed: int = 0) -> np.ndarray:
    """A synthetic trace ``[B, P + W, L, k]`` of ``shape`` with generator ``params``
    (:data:`PARAMS`, and ``drift_share``: :data:`DEFAULT_SHARE` if absent)."""
    from cluster.core.routing import synthetic
    from cluster.core.spec import ModelSpec, WorkloadSpec

    model = ModelSpec(name="fit", num_layers=shape.num_layers, num_experts=shape.num_experts,
                      top_k=shape.top_k)
    work = WorkloadSpec(batch_size=shape.sequences, prompt_tokens=shape.prompt_tokens,
                        output_tokens=shape.decode_tokens + 1, seed=seed,
                        drift_share=float(params.get("drift_share", DEFAULT_SHARE)),
                        popularity=str(params.get("popularity", "zipf")),
                        **{p: float(params[p]) for p in PARAMS})
    return synthetic(model, work, np.random.default_rng([seed, 0xF17])).topk_ids


def simulated_stats(shape: Shape, params: dict[str, float], seed: int = 0) -> RoutingStats:
    return measure(simulate(shape, params, seed), shape.prompt_tokens, shape.num_experts,
                   shape.decode_tokens)


# search space: each parameter mapped to an unbounded-ish coordinate and back
_LO = {"alpha": 0.0, "reuse": 0.0, "drift": -4.0, "drift_jump": 0.0}
_HI = {"alpha": 3.0, "reuse": 0.9, "drift": 0.0, "drift_jump": 1.0}


def _box(popularity: str) -> tuple[dict[str, float], dict[str, float]]:
    """The search box (``drift`` as log10) for one popularity shape."""
    return _LO, {**_HI, "alpha": 10.0 if popularity == "exponential" else _HI["alpha"]}


def _to_params(x: np.ndarray, popularity: str = "zipf") -> dict[str, float]:
    lo, hi = _box(popularity)
    out = {}
    for v, p in zip(x, PARAMS):
        v = float(np.clip(v, lo[p], hi[p]))
        out[p] = 10 ** v if p == "drift" else v
    return out


def _to_x(params: dict[str, float]) -> np.ndarray:
    return np.array([np.log10(max(params[p], 1e-4)) if p == "drift" else params[p] for p in PARAMS])


@dataclass
class Fit:
    """The fitted parameters, their statistics and the search's record."""

    params: dict[str, float | str]
    stats: RoutingStats
    error: float  # root mean square difference over the fitted statistics
    evaluations: int
    history: list[tuple[dict[str, float], float]] = field(default_factory=list)


def loss(target: dict[str, float], got: dict[str, float], names=STATS) -> float:
    """Root mean square difference over ``names`` that both sides have (NaN: left out)."""
    d = [(target[n] - got[n]) ** 2 for n in names if n in target and n in got
         and np.isfinite(target[n]) and np.isfinite(got[n])]
    return float(np.sqrt(np.mean(d))) if d else float("nan")


def nelder_mead(f, x0: np.ndarray, step: np.ndarray, iters: int = 60, tol: float = 1e-4
                ) -> tuple[np.ndarray, float]:
    """Minimises ``f`` from ``x0`` (plain Nelder-Mead: reflect, expand, contract, shrink)."""
    n = x0.size
    pts = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def fit(target: RoutingStats | dict[str, float], shape: Shape | None = None, seed: int = 0,
        names: tuple[str, ...] = STATS, fit_layers: int = 8, iters: int = 60,
        drift_share: float = DEFAULT_SHARE, popularity: str | None = None) -> Fit:
    """The better of :func:`fit_shape` with each popularity shape (``zipf``, ``lognormal``),
    or with the one given."""
    shapes = [popularity] if popularity else ["zipf", "lognormal", "exponential"]
    fits = [fit_shape(target, shape, seed, names, fit_layers, iters, drift_share, s) for s in shapes]
    best = min(fits, key=lambda f: f.error)
    best.evaluations = sum(f.evaluations for f in fits)
    return best


def fit_shape(target: RoutingStats | dict[str, float], shape: Shape | None = None, seed: int = 0,
              names: tuple[str, ...] = STATS, fit_layers: int = 8, iters: int = 60,
              drift_share: float = DEFAULT_SHARE, popularity: str = "zipf") -> Fit:
    """Generator parameters whose synthetic trace of ``shape`` matches ``target``'s statistics.

    ``target``: measured statistics (its shape is used unless ``shape`` is given) or a dict of
    statistic values (then ``shape`` is required; ``names`` may leave some out, e.g.
    ``halves25`` when only the issue's table is known). Candidates are simulated with at most
    ``fit_layers`` layers (layers are independent and identically distributed in the
    generator, so fewer layers only add sampling noise) and one seed.
    """
    if isinstance(target, RoutingStats):
        shape = shape or shape_of(target)
        want = target.values
    else:
        want = dict(target)
        if shape is None:
            raise ValueError("fit: a dict target needs a shape")
    sim = Shape(shape.sequences, shape.prompt_tokens, shape.decode_tokens,
                min(shape.num_layers, fit_layers), shape.num_experts, shape.top_k)
    hist: list[tuple[dict[str, float], float]] = []
    memo: dict[tuple, float] = {}
    lo, hi = _box(popularity)
    a_grid = (1.0, 3.0, 5.0, 8.0) if popularity == "exponential" else (0.3, 0.8, 1.4, 2.0)

    def f(x: np.ndarray) -> float:
        params = {**_to_params(x, popularity), "drift_share": drift_share,
                  "popularity": popularity}
        key = tuple(round(float(params[p]), 6) for p in PARAMS)
        if key not in memo:
            got = simulated_stats(sim, params, seed).values
            memo[key] = loss(want, got, names)
            hist.append((params, memo[key]))
        # a gentle pull back inside the box keeps the simplex from wandering off its edges
        out = sum(max(0.0, lo[p] - v) + max(0.0, v - hi[p]) for v, p in zip(x, PARAMS))
        return memo[key] + out

    grid = [{"alpha": a, "reuse": r, "drift": d, "drift_jump": j}
            for a in a_grid for r in (0.05, 0.3) for d in (0.003, 0.05)
            for j in (0.2, 0.8)]
    starts = sorted(grid, key=lambda p: f(_to_x(p)))[:2]
    best_x, best = None, np.inf
    for p0 in starts:
        step = np.array([1.0 if popularity == "exponential" else 0.25, 0.08, 0.5, 0.25])
        x, v = nelder_mead(f, _to_x(p0), step, iters=iters)
        if v < best:
            best_x, best = x, v
    params = {**_to_params(best_x, popularity), "drift_share": drift_share,
              "popularity": popularity}
    stats = simulated_stats(shape, params, seed)
    return Fit(params, stats, loss(want, stats.values, names), len(memo), hist)


# --- the figure ----------------------------------------------------------------------------

def plot_curves(path: Path, real: RoutingStats, fitted: RoutingStats | None,
                title: str = "") -> Path:
    """Per-layer coverage curves, the trace against the fitted generator: decode share on the
    prefill's top x% experts, and the experts the decode has used after n tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.3))
    xs = np.linspace(0, 100, 101)
    for st, color, label in ((real, "#1f77b4", "trace"), (fitted, "#d62728", "fitted generator")):
        if st is None:
            continue
        for lay in range(st.num_layers):
            a1.plot(xs, st.share_curve[lay] * 100, color=color, lw=0.5, alpha=0.25)
            a2.plot(np.arange(1, st.decode_tokens + 1), st.coverage_curve[lay] * 100, color=color,
                    lw=0.5, alpha=0.25)
        a1.plot(xs, np.nanmean(st.share_curve, 0) * 100, color=color, lw=2.2,
                label=f"{label} (mean of {st.num_layers} layers)")
        a2.plot(np.arange(1, st.decode_tokens + 1), st.coverage_curve.mean(0) * 100, color=color,
                lw=2.2, label=label)
    a1.plot([0, 100], [0, 100], color="black", ls=":", lw=1, label="no information (uniform)")
    a1.set_xlabel("prefill's most used experts (% of the layer's experts)")
    a1.set_ylabel("share of decode activations on them (%)")
    a1.set_title("Does the prefill predict the decode? (thin: one layer)")
    a2.set_xlabel("decode tokens")
    a2.set_ylabel("experts used at least once (%)")
    a2.set_title("Decode coverage")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
