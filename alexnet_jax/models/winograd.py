"""Stride-1 convolutions by Winograd's minimal filtering F(m x m, r x r), an opt-in for CPUs.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (arXiv 1509.09308):
each m x m tile of output is computed from an (m+r-1)^2 tile of input as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

so the (m+r-1)^2 elementwise products, summed over input channels, become that many
independent matrix products of shape (tiles, C_in) x (C_in, C_out). For AlexNet's 3x3
and 5x5 layers with m = 2 that is 2.3x and 2.8x fewer multiplications than the direct
convolution, and the matrix products run at XLA's GEMM speed, which on CPU is well above
its convolution speed. docs/performance.md says what it costs; benchmarks/RESULTS.md has
the measurements.

The transforms are built exactly (fractions) by Cook-Toom interpolation at the points
0, 1, -1, 2, -2, ... and infinity. The input and output transforms are applied as
explicit sums of strided slices, which XLA fuses into memory-bound loops; the matmul
forms of them (a stack of every tile's pixels times a small matrix) or one batched GEMM
over a stacked input are slower, because XLA's CPU backend copies every stack
(concatenate) once more. The kernel transform is one small matmul, split with
`jnp.split`, whose transpose is one concatenate.

Costs, which is why it is not the default: XLA compiles every distinct fused sum on its
own, so a program with these layers takes seconds more to compile; the products kept for
the backward pass are several times the layer's input. The output transform interleaves
tiles with a stack whose fused operands XLA evaluates element by element, which is why m
stays 2: at m = 3 or 4 that loop costs more than the saved multiplications.

Numerics: with m = 2 the float32 error is a few times the direct convolution's (more for
5x5 kernels than 3x3; the tests bound both); float64 agrees to ~1e-15. Inputs narrower
than float32 are computed in float32.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

# Interpolation points in the order that keeps the transforms' coefficients smallest;
# infinity is always the last point. F(m, r) uses the first m + r - 2 of them.
POINTS: tuple[Fraction, ...] = tuple(Fraction(p) for p in (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), 3, -3))

Matrix = tuple[tuple[Fraction, ...], ...]


def _inverse(m: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact inverse by Gauss-Jordan elimination (the matrices here are at most 10 x 10)."""
    n = len(m)
    a = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(m)]
    for c in range(n):
        pivot = next(r for r in range(c, n) if a[r][c] != 0)
        a[c], a[pivot] = a[pivot], a[c]
        a[c] = [v / a[c][c] for v in a[c]]
        for r in range(n):
            if r != c and a[r][c] != 0:
                f = a[r][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
    return [row[n:] for row in a]


@functools.cache
def transforms(m: int, r: int) -> tuple[Matrix, Matrix, Matrix]:
    """(A^T, G, B^T) of F(m, r), exact.

    A polynomial product h(x) g(x), deg h = m-1 and deg g = r-1, is evaluated at the
    points and infinity (rows of a Vandermonde matrix E_k for k coefficients) and
    interpolated back; transposing that bilinear algorithm turns the convolution into
    the correlation a CNN computes: A^T = E_m^T, G = E_r, B^T = (E_n^{-1})^T with
    n = m + r - 1. Each row of B^T is scaled to integers, the scale moved into G, so the
    input transform (applied to every activation) is sums with small integer weights.
    """
    n = m + r - 1
    if m < 1 or r < 1 or n - 1 > len(POINTS):
        raise ValueError(f"F({m}, {r}) needs {n - 1} interpolation points; {len(POINTS)} are defined")
    points = POINTS[: n - 1]

    def evaluation(k: int) -> list[list[Fraction]]:
        rows = [[p**i for i in range(k)] for p in points]
        return rows + [[Fraction(int(i == k - 1)) for i in range(k)]]  # the point at infinity

    g = evaluation(r)
    at = [list(col) for col in zip(*evaluation(m))]
    bt = [list(col) for col in zip(*_inverse(evaluation(n)))]
    for j in range(n):
        scale = math.lcm(*(v.denominator for v in bt[j]))
        bt[j] = [v * scale for v in bt[j]]
        g[j] = [v / scale for v in g[j]]
    as_tuple = lambda mat: tuple(tuple(row) for row in mat)  # noqa: E731
    return as_tuple(at), as_tuple(g), as_tuple(bt)


def _combine(coefficients, terms):
    """sum(c * t) over the nonzero coefficients, with +-1 as plain adds and subtracts."""
    total = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        t = t if c == 1 else -t if c == -1 else t * float(c)
        total = t if total is None else total + t
    if total is None:
        raise ValueError("a transform row with no nonzero coefficient")  # cannot happen for F(m, r)
    return total


def conv(x: jnp.ndarray, kernel: jnp.ndarray, padding: int, tile: int = 2) -> jnp.ndarray:
    """Stride-1 convolution of NHWC `x` with an HWIO square `kernel`, zero `padding` on each side.

    The same function as `lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`, computed by F(tile x tile, r x r).
    Differentiable in both arguments, in forward and reverse mode.
    """
    n, h, w, c = x.shape
    r, r2, c_in, c_out = kernel.shape
    if r != r2 or c_in != c:
        raise ValueError(f"need a square kernel with {c} input channels, got {kernel.shape}")
    out_h, out_w = h + 2 * padding - r + 1, w + 2 * padding - r + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {h}x{w} input with padding {padding} is smaller than the {r}x{r} kernel")
    if jnp.finfo(x.dtype).bits < 32:
        # The transforms add and cancel terms of mixed sign (weights up to 5, fractions down
        # to 1/576 for 5x5): in bf16 that is ~20x the direct convolution's error. Work in float32.
        return conv(x.astype(jnp.float32), kernel.astype(jnp.float32), padding, tile).astype(x.dtype)
    m, a = tile, tile + r - 1
    at, g, bt = transforms(m, r)
    th, tw = -(-out_h // m), -(-out_w // m)  # tiles; the last may hang over and is cropped
    # Pad to exactly the rows and columns the tiles read: (t-1)*m + a.
    xp = jnp.pad(
        x,
        ((0, 0), (padding, (th - 1) * m + a - h - padding), (padding, (tw - 1) * m + a - w - padding), (0, 0)),
    )

    # Input transform B^T d B, separably: along rows, then along columns.
    rows = [xp[:, k : k + m * (th - 1) + 1 : m] for k in range(a)]  # (n, th, W', c)
    by_rows = [_combine(bt[i], rows) for i in range(a)]
    v = []
    for i in range(a):
        cols = [by_rows[i][:, :, k : k + m * (tw - 1) + 1 : m] for k in range(a)]  # (n, th, tw, c)
        v += [_combine(bt[j], cols).reshape(n * th * tw, c) for j in range(a)]

    # Kernel transform G g G^T as one small matmul, (a*a, r*r) x (r*r, C_in*C_out): the
    # kernel is small, and one op instead of a*a sums keeps XLA's compile time down.
    gg = np.array([[float(g[i][k] * g[j][q]) for k in range(r) for q in range(r)] for i in range(a) for j in range(a)])
    u_all = jnp.dot(jnp.asarray(gg, kernel.dtype), kernel.reshape(r * r, c * c_out), precision=lax.Precision.HIGHEST)
    u = [ui.reshape(c, c_out) for ui in jnp.split(u_all, a * a)]

    # One GEMM per position of the transformed tile. Separate dots, not one batched
    # dot: stacking the transformed inputs would cost XLA a concatenate as large as them.
    # (Merging the batch axis into the rows keeps a batch sharding: it is the major axis.)
    prods = [jnp.dot(vi, ui).reshape(n, th, tw, c_out) for vi, ui in zip(v, u)]

    # Output transform A^T M A, assembled into (n, th, m, tw, m, c_out) and untiled.
    out = [
        [_combine([at[p][i] * at[q][j] for i in range(a) for j in range(a)], prods) for q in range(m)] for p in range(m)
    ]
    y = jnp.stack([jnp.stack(out[p], axis=3) for p in range(m)], axis=2)
    return _untile(y)[:, :out_h, :out_w]


def _untile(y: jax.Array) -> jax.Array:
    """(n, th, m, tw, m, c) -> (n, th*m, tw*m, c), keeping a batch or channel axis sharded.

    Under a mesh with explicit axes JAX asks what sharding such a reshape gives; the tile
    axes must not be sharded (nothing here shards them: they are made inside the layer).
    """
    n, th, m, tw, _, c = y.shape
    spec = tuple(jax.typeof(y).sharding.spec)
    spec += (None,) * (y.ndim - len(spec))
    if any(spec[1:5]):
        raise ValueError(
            f"Winograd convolution needs unsharded spatial axes, got the tile sharding {spec}; "
            "use conv_algorithm='xla' when sharding images along height or width"
        )
    out_sharding = P(spec[0], None, None, spec[5]) if spec[0] or spec[5] else None
    return lax.reshape(y, (n, th * m, tw * m, c), out_sharding=out_sharding)


def use_winograd(dtype) -> bool:
    """Whether the 'auto' algorithm picks Winograd: float32/float64 on a CPU backend.

    On GPU and TPU the vendor convolutions are already fast and, in bf16, Winograd's
    extra additions would cost accuracy that float32 does not notice. Decided when the
    model is traced, from `jax.default_backend()`: a program placed on a CPU of a machine
    whose default backend is a GPU gets XLA's convolution; pass conv_algorithm explicitly there.
    """
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
