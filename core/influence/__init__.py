"""Stage 2: influence scores of the training samples on the surrogate, plus the GraNd and EL2N baselines.

The package, one module per stage, in the order a reader needs it (each module imports only those before it):
- `loss`: the fixed per-sample loss l(z): `effective_damping`, `samples_with_loss`, `fixed_negatives`, batches
  by line length, `_theta_only` (only theta requires grad); the `Progress` and `Cancel` callbacks and
  `_poll`, shared by every stage;
- `grads`: per-sample gradients in one backward (`per_sample_grads`), the reference's loop
  (`per_sample_grads_loop`, a baseline) and v (`gradient_mean`);
- `rows`: the fast path's rows: the cached rows (`_Rows`), the loss downstream of theta row by row
  (`_RowModel`) and the rows' curvature in closed form (`_LNState`, `_Curvature`);
- `hessian`: Hessian-vector products: `hvp` (the generic path), `LossHessian` (products, LiSSA's step
  operators, the dense Hessian) and `_HessianBuilder` (collects the rows during a pass);
- `solvers`: s = (H + lambda I)^-1 v by `lissa`, `conjugate_gradient` or `direct`; `SolverDiverged`;
- `scores`: `influence_scores`: one pass (v, GraNd, EL2N, the rows), one solve, the scores.

Notation. theta = the weight W (out x in) of one nn.Linear of the surrogate (by default the attention
output projection of the last block; its bias is *not* part of theta). Each user u with at least one
transition (a training line of >= 2 items) is one sample z with loss l(z) = `per_sample_loss`: its
own BCE averaged over its own target positions, with ONE seeded draw of negatives per sample, drawn once
and reused for v, for every Hessian sample and for the per-sample gradients, so that the scores are
reproducible. The model is always in eval() mode (no dropout), so l(z) is a deterministic function.

    R(theta) = 1/n sum_z l(z)        over the n samples that have a loss (users without a transition
                                     have l = 0 and no gradient; counting them in the mean would only
                                     rescale v and H by the same n/N, so they are left out of both)
    v        = grad R = 1/n sum_z grad l(z)
    H        = hess R = 1/n sum_z H_z
    influence(z) = < grad l(z), s >,  s = (H + lambda I)^-1 v

LiSSA and the damping it really applies. The reference recursion, with one random sample z_k per
step, is

    h_0 = v,    h_{k+1} = v + (1 - d) h_k - H_{z_k} h_k / c        (d = `damping`, c = `scale`).

In expectation its fixed point satisfies h* = v + (1 - d) h* - H h* / c, i.e. (d I + H / c) h* = v,
    h* = c (H + c d I)^-1 v,   so   h* / c = (H + lambda I)^-1 v   with   lambda = c * d.
The paper's estimate is h* / c (the reference forgets the division; a uniform factor). With the
reference constants (d = 0.01, c = 25) the effective damping is lambda = 0.25, NOT 0.01. The `cg` and
`direct` solvers therefore solve the same system (H + c d I) s = v, so the three solvers agree; the
function `effective_damping(cfg)` gives lambda. The expected recursion is the Richardson iteration
h <- h + (v - (d I + H / c) h): its error shrinks by max |1 - d - mu / c| per step over the eigenvalues
mu of H, so it converges iff -c d < mu < (2 - d) c (H + lambda I positive definite, c above about half
the largest eigenvalue; per-sample H_z beyond 2c make single steps unstable too). At the defaults that
is about 100 steps per factor e; the other steps average sampling noise. One sample per step leaves s
a random variable (a few % relative error on the test problem); `lissa(batch=k)` averages k samples
per step (k = 1 is the reference; `InfluenceConfig` has no such field, `influence_scores` reads
`cfg.lissa_batch` if one is added).

Indefinite Hessians. A surrogate that is not at a minimum may have H + lambda I with negative
eigenvalues. Then LiSSA diverges (we detect it and raise `SolverDiverged`), CG meets a direction of
negative curvature (it stops there, returns its iterate so far and logs a warning), and `direct`
solves the linear system anyway (logging a warning: the result is still (H + lambda I)^-1 v, but it is
not the minimiser of a convex quadratic any more).

Per-sample gradients in one backward. For a linear layer out = X W^T + b applied once per forward,
grad_W l(z) = sum_t G_zt^T X_zt with X_z (t x in) the layer input and G_z = d l(z) / d out_z (t x out).
Samples do not interact in eval mode (attention, LayerNorm and the loss are per sequence), so one
backward of sum_z l(z) gives every G_z, and the per-sample gradients of a whole batch are one einsum.

The fast path. When theta is the attention output of the LAST block (the reference's choice), each
target position of each sample depends on theta only through its own row: out_r = W x_r + b, then
LayerNorm(out_r + residual_r), the feed-forward, LayerNorm and the BCE of that position. The pass that
computes the per-sample gradients therefore also caches the rows (x_r, residual_r, g_r = d l / d out_r,
positive, negative, 1/k_z) of all samples (about 200 MB on Games), after checking on the first batch
that the row model reproduces the real model's losses (else: the generic path below). Then
  - the scores need no second pass: <grad l(z), s> = sum_{r in z} g_r . (S x_r);
  - a Hessian-vector product is sum_r w_r (A_r (V x_r)) x_r^T with A_r = d^2 term_r / d out_r^2, and
    A_r t has a closed form (`_Curvature`: Jacobians and curvatures of LayerNorm, GELU feed-forward and
    BCE) checked against autograd on the first rows (else: double backward on the rows). LiSSA
    precomputes the rows' curvature for a chunk of upcoming steps in one vectorised call, so that one
    step costs a handful of small products (~0.5 ms on one CPU thread, against ~3 ms for a double
    backward on the rows and ~4 ms through the whole model);
  - the dense Hessian is H = sum_r w_r A_r (x) x_r x_r^T: one (out*out x R) @ (R x in*in) product,
    instead of out*in Hessian-vector products.
The generic path (any other Linear, or a model the row model does not reproduce) runs the full model
for every Hessian product (`hvp`) and makes a second pass for the scores.
"""

from __future__ import annotations

from core.influence.grads import gradient_mean, per_sample_grads, per_sample_grads_loop
from core.influence.hessian import LossHessian, hvp
from core.influence.loss import Cancel, Progress, effective_damping, fixed_negatives, samples_with_loss
from core.influence.rows import _Curvature, _RowModel
from core.influence.scores import influence_scores
from core.influence.solvers import SampleHessians, SolverDiverged, conjugate_gradient, direct, lissa
from core.surrogate.train import Cancelled

__all__ = [
    "Cancelled", "SolverDiverged", "LossHessian", "SampleHessians", "effective_damping", "fixed_negatives",
    "samples_with_loss", "per_sample_grads", "per_sample_grads_loop", "gradient_mean", "hvp", "lissa",
    "conjugate_gradient", "direct", "influence_scores",
    # The callback types, and two internals the tests reach for.
    "Progress", "Cancel", "_RowModel", "_Curvature",
]
