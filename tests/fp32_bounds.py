"""How far two fp32 evaluations of the same math may drift apart, argued from the operation.

BLAS chooses the summation order per kernel: a 1-row and a 4-row product, AVX2 and AVX-512
(OpenBLAS ``DYNAMIC_ARCH`` picks at run time), one thread or four, each add the ``K`` terms of
a dot product differently. Whatever the order, with or without FMA (Higham, *Accuracy and
Stability of Numerical Algorithms*, section 3.1)::

    |fl(a . b) - a . b| <= gamma_K * sum_i |a_i b_i|,   gamma_K = K u / (1 - K u),  u = 2**-24

so two fp32 evaluations differ by at most ``2 gamma_K sum_i |a_i b_i|``. That is a bound
*relative to the magnitude of the operands* (``|a| @ |b|``), not to the result: a result that
cancels to nearly zero may carry a large relative error, and an elementwise ``rtol`` on the
result is exactly what failed on another machine. For the widths in the tests (``K`` <= 128)
``2 gamma_K`` is ~1e-5.

Elementwise IEEE operations (``+ - * /``, ``sqrt``) are correctly rounded and the same on
every CPU; ``tanh``/``exp`` may differ by an ulp or two between numpy's SIMD paths. Results
are bit-identical only for the same call on the same shapes in one process, and that is the
only place the tests compare bytes.
"""

from __future__ import annotations

import numpy as np

from cluster.core.reference import scaled_model
from cluster.core.spec import Config

U = 2.0 ** -24  # unit roundoff of float32


def gamma(k: int) -> float:
    """Higham's ``gamma_K``: the relative bound of a ``K``-term fp32 sum of products."""
    return k * U / (1 - k * U)


def magnitude(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a| @ |b|`` in float64: per output element, the ``sum_i |a_i b_i|`` the bound scales."""
    return np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))


def swiglu_magnitude(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray,
                     w_down: np.ndarray) -> np.ndarray:
    """``S = ((|x| @ |Wg|) * (|x| @ |Wu|)) @ |Wd|`` ``[n, d]``: the operand magnitude of SwiGLU.

    ``S`` bounds ``|swiglu(x)|`` and is additive over a partition of the ``d_ff`` columns.
    """
    return (magnitude(x, w_gate) * magnitude(x, w_up)) @ np.abs(np.asarray(w_down, np.float64))


def swiglu_rtol(d: int, c: int) -> float:
    """``|fp32 swiglu - exact| <= swiglu_rtol(d, c) * S``, whatever the BLAS kernels.

    With ``G = |x| @ |Wg|``, ``V = |x| @ |Wu|`` (``d`` terms): ``|dg| <= gamma_d G``,
    ``|du| <= gamma_d V``; ``silu`` has slope in [-0.1, 1.1], ``|silu(g)| <= |g|`` and its
    ``tanh`` form is good to a few ulp, so ``h = silu(g) u`` has
    ``|dh| <= (2.1 gamma_d + 8u) G V``. The down projection (``c`` terms) adds
    ``gamma_c |h| @ |Wd|`` with ``|h| <= G V``. At ``d = 48, c = 40``: 8.9e-6.
    """
    return 2.1 * gamma(d) + gamma(max(c, 1)) + 8 * U


def layer_mix_error_bound(x: np.ndarray, w_o: np.ndarray) -> np.ndarray:
    """Bound ``[n, d]`` on ``|fp32 layer_mix - exact|`` for ``x + rms_norm(x) @ W_o``.

    ``mean(x**2)`` sums ``d`` positive terms: relative error <= ``gamma_d + u``, no
    cancellation; ``1/sqrt(. + eps)`` halves it and adds three roundings, so each element of
    ``xn`` is good to ``gamma_d / 2 + 5u`` relative. The matmul adds ``gamma_d`` of
    ``M = |xn| @ |W_o|``, the final addition ``u (|x| + M)``.
    """
    d = x.shape[-1]
    xn = np.asarray(x, np.float64)
    xn = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6)
    m = magnitude(xn, w_o)
    return (1.5 * gamma(d) + 6 * U) * m + U * np.abs(np.asarray(x, np.float64))


def forward_tolerance(cfg: Config, scale: float, out: np.ndarray) -> np.ndarray:
    """How far two fp32 evaluations of the whole forward may differ: ``[..., 1]`` per position
    of ``out`` (``[..., d_model_s]``, the reference forward of ``cfg`` at ``scale``).

    The emulator computes every position in other groupings than the reference (a step's
    tokens, a device's rows, an expert's column slices), so BLAS takes other kernels and sums
    in other orders. Each layer adds to the residual stream terms that are dot products of
    unit-RMS normed inputs with 1/K-variance weights; two evaluations of such a term differ by
    <= 2 gamma_K of its operands' magnitude (fp32_bounds), K the layer's widest sum, and that
    magnitude is of the order of the row's RMS. The differences add up over the layers (each
    layer normalises its input, so they are not amplified). This is the per-layer bound with
    the row's RMS standing in for the operands; the worst case compounded over 16-27 layers
    would say nothing. Measured: 2e-6 (olmoe, 16 layers) and 6e-6 (deepseek, 27) of the row's
    RMS, against 2.4e-4 and 4.8e-4 allowed; routing one token to other experts moves it by
    more than 1e-2 (test_reference.py).
    """
    sm = scaled_model(cfg, scale)
    widest_moe = max(sm.d_model_s, sm.d_ff_s, sm.shared_d_ff_s)
    widest_dense = max(sm.d_model_s, sm.dense_d_ff_s)
    per_row = 2 * (cfg.model.num_layers * gamma(widest_moe)
                   + cfg.model.num_dense_layers * gamma(widest_dense))
    return per_row * np.sqrt((out.astype(np.float64) ** 2).mean(-1, keepdims=True))


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray | float,
                  what: str = "") -> None:
    """``|got - want| <= bound`` elementwise; the message gives the worst element's ratio."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), got64.shape)
    err = np.abs(got64 - want64)
    over = err > bound
    if over.any():
        i = np.unravel_index(np.argmax(err / np.maximum(bound, 1e-300)), err.shape)
        raise AssertionError(
            f"{what}: {int(over.sum())} of {err.size} elements beyond the fp32 bound; worst at "
            f"{tuple(int(j) for j in i)}: |{got64[i]!r} - {want64[i]!r}| = {err[i]:.3g} > "
            f"{bound[i]:.3g}")
