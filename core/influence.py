"""Stage 2: influence scores of the training samples on the surrogate, plus the GraNd and EL2N baselines.

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

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.config import InfluenceConfig
from core.data.dataset import RecDataset
from core.surrogate.batches import SeqBatch, make_batch, per_sample_loss, sample_negatives
from core.surrogate.train import Cancelled

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]

__all__ = [
    "Cancelled", "SolverDiverged", "LossHessian", "SampleHessians", "effective_damping", "fixed_negatives",
    "samples_with_loss", "per_sample_grads", "per_sample_grads_loop", "gradient_mean", "hvp", "lissa",
    "conjugate_gradient", "direct", "influence_scores",
]

# Rows per chunk for full-data Hessian products on the fast path (bounds the double-backward graph).
_ROW_CHUNK = 16384
# LiSSA checks for divergence (one device sync) every this many steps.
_LISSA_CHECK_EVERY = 250


class SolverDiverged(RuntimeError):
    """LiSSA's recursion blew up: H + damping*scale*I is not positive definite or scale is too small."""


# ----------------------------------------------------------------------------------------------
# The fixed per-sample loss


def effective_damping(cfg: InfluenceConfig) -> float:
    """lambda of the system (H + lambda I) s = v that LiSSA solves (module docstring): scale * damping."""
    return cfg.scale * cfg.damping


def samples_with_loss(ds: RecDataset, users: Sequence[int] | None = None) -> np.ndarray:
    """Users with at least one transition (>= 2 training items): the samples that have a loss."""
    pool = range(ds.n_users) if users is None else users
    return np.asarray([int(u) for u in pool if len(ds.train[int(u)]) >= 2], dtype=np.int64)


def fixed_negatives(ds: RecDataset, max_len: int, seed: int) -> list[np.ndarray]:
    """ONE seeded draw of negatives for every user, indexed by user (empty for users without a transition).
    The same draw defines l(z) for v, for the Hessian and for the per-sample gradients."""
    out = [np.zeros(0, dtype=np.int64) for _ in range(ds.n_users)]
    samples = samples_with_loss(ds)
    for u, neg in zip(samples, sample_negatives(ds, samples, max_len, np.random.default_rng(seed))):
        out[int(u)] = neg
    return out


def _make_batch(ds: RecDataset, users: np.ndarray, max_len: int, negatives: Sequence[np.ndarray],
                device: torch.device | str) -> SeqBatch:
    # Trimmed to the batch's widest line: the outputs at real positions are those of the full window.
    return make_batch(ds, users, max_len, [negatives[int(u)] for u in users], trim=True).to(device)


def _by_length(ds: RecDataset, users: np.ndarray) -> np.ndarray:
    """Users ordered by line length (stable), so that consecutive batches are narrow and similar."""
    lengths = np.fromiter((len(ds.train[int(u)]) for u in users), dtype=np.int64, count=len(users))
    return users[np.argsort(lengths, kind="stable")]


def _max_len(model: nn.Module) -> int:
    return int(model.cfg.max_seq_length)


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("influence computations need the model in eval() mode (no dropout)")


@contextlib.contextmanager
def _theta_only(model: nn.Module, layer: nn.Linear) -> Iterator[None]:
    """Only theta requires grad while inside: autograd records nothing upstream of the layer and
    computes no gradient for any other parameter (the bias included: it is not part of theta)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        layer.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# Per-sample gradients


@dataclass
class _Captured:
    """What one forward + backward gives per batch: the layer's input X (b, t, in), the gradient of each
    sample's loss w.r.t. the layer's output G (b, t, out), the model output (b, t, h) and, when asked,
    the input of a chosen module (the residual stream of the fast path)."""

    x: torch.Tensor
    g: torch.Tensor
    hidden: torch.Tensor
    losses: torch.Tensor
    extra: torch.Tensor | None


def _forward_backward(model: nn.Module, layer: nn.Linear, batch: SeqBatch,
                      extra_input_of: nn.Module | None = None) -> _Captured:
    """One forward with hooks, then ONE backward of sum_z l(z) w.r.t. the layer's output only.

    We ask autograd for d(sum l)/d(out) directly (torch.autograd.grad with the captured output as input)
    rather than hooking the output tensor during loss.backward(): the result is the same G, but no
    parameter .grad is touched and the backward stops at the layer's output."""
    box: dict[str, torch.Tensor] = {}
    calls = [0]

    def on_layer(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        calls[0] += 1
        box["x"], box["out"] = args[0].detach(), out

    def on_model(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        box["hidden"] = out.detach()

    def on_extra(_m: nn.Module, args: tuple) -> None:
        box["extra"] = args[0].detach()

    handles = [layer.register_forward_hook(on_layer), model.register_forward_hook(on_model)]
    if extra_input_of is not None:
        handles.append(extra_input_of.register_forward_pre_hook(on_extra))
    try:
        with _theta_only(model, layer), torch.enable_grad():
            losses = per_sample_loss(model, batch)
            if calls[0] != 1:
                raise ValueError(f"the influence layer ran {calls[0]} times in one forward; the closed-form "
                                 "per-sample gradient needs exactly one call")
            (g,) = torch.autograd.grad(losses.sum(), box["out"])
    finally:
        for h in handles:
            h.remove()
    return _Captured(box["x"], g.detach(), box["hidden"], losses.detach(), box.get("extra"))


def _grads_from(cap: _Captured) -> torch.Tensor:
    """grad_W l(z) = sum_t G_zt^T X_zt for every sample of the batch: (b, out, in)."""
    return torch.einsum("bto,bti->boi", cap.g, cap.x)


def per_sample_grads(model: nn.Module, ds: RecDataset, users: Sequence[int], negatives: Sequence[np.ndarray],
                     layer: nn.Linear, batch_size: int = 1024, device: torch.device | str = "cpu",
                     ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (users of the batch, their gradients grad_W l(z), shape (b, out, in)) batch by batch,
    the users ordered by line length (narrow batches), not in the order given.

    `negatives` is indexed by user (see `fixed_negatives`); users without a transition get a zero
    gradient. The model must be in eval() mode and on `device`."""
    _check_eval(model)
    users = _by_length(ds, np.asarray(users, dtype=np.int64))
    for start in range(0, len(users), batch_size):
        part = users[start:start + batch_size]
        cap = _forward_backward(model, layer, _make_batch(ds, part, _max_len(model), negatives, device))
        yield part, _grads_from(cap)


def per_sample_grads_loop(model: nn.Module, ds: RecDataset, users: Sequence[int],
                          negatives: Sequence[np.ndarray], layer: nn.Linear,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """The reference's way, kept as a baseline for tests and benchmarks: one forward and one
    torch.autograd.grad per sample (batch size 1). Returns (len(users), out, in)."""
    _check_eval(model)
    out = []
    with _theta_only(model, layer), torch.enable_grad():
        for u in users:
            batch = _make_batch(ds, np.asarray([u]), _max_len(model), negatives, device)
            loss = per_sample_loss(model, batch)[0]  # 0 (and a zero gradient) without a transition
            out.append(torch.autograd.grad(loss, layer.weight)[0])
    return torch.stack(out) if out else layer.weight.new_zeros((0, *layer.weight.shape))


def gradient_mean(model: nn.Module, ds: RecDataset, negatives: Sequence[np.ndarray], layer: nn.Linear,
                  users: Sequence[int] | None = None, batch_size: int = 1024,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """v = mean of grad_W l(z) over the samples that have a loss (users with >= 2 training items, among
    `users` if given). Users without a transition have no loss term; leaving them out of the count keeps
    v and the Hessian (also averaged over these samples) the gradient and Hessian of the SAME risk."""
    samples = samples_with_loss(ds, users)
    if len(samples) == 0:
        raise ValueError("no user has a transition (>= 2 training items)")
    total = torch.zeros_like(layer.weight)
    for _, g in per_sample_grads(model, ds, samples, negatives, layer, batch_size, device):
        total += g.sum(0)
    return total / len(samples)


# ----------------------------------------------------------------------------------------------
# Hessian-vector products


def hvp(model: nn.Module, batch: SeqBatch, layer: nn.Linear, vec: torch.Tensor) -> torch.Tensor:
    """H_batch vec, H_batch the Hessian w.r.t. W of the MEAN per-sample loss of `batch` (double backward).
    Runs the whole model: the generic path. `vec` has W's shape."""
    _check_eval(model)
    with _theta_only(model, layer), torch.enable_grad():
        loss = per_sample_loss(model, batch).mean()
        (g,) = torch.autograd.grad(loss, layer.weight, create_graph=True)
        (hv,) = torch.autograd.grad((g * vec).sum(), layer.weight)
    return hv


@dataclass
class _Rows:
    """Every target position of every sample, as rows, for the fast path (module docstring). Rows of a
    sample are contiguous: sample j owns rows start[j]:start[j + 1]."""

    x: torch.Tensor        # (R, in)  input of theta's layer
    resid: torch.Tensor    # (R, h)   residual stream entering the attention block
    pos: torch.Tensor      # (R,)     positive item
    neg: torch.Tensor      # (R,)     negative item
    weight: torch.Tensor   # (R,)     1 / k_z: the row's share of its sample's loss
    start: np.ndarray      # (n + 1,) row offsets
    g: torch.Tensor | None = None  # (R, out) d l(z) / d out_r: grad l(z) = sum_r g_r x_r^T (0 elsewhere)

    def per_sample_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-row values over each sample's rows: (R,) -> (n,)."""
        counts = torch.as_tensor(np.diff(self.start), device=values.device)
        owner = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
        return torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, owner, values)

    def influence(self, s: torch.Tensor) -> torch.Tensor:
        """<grad l(z), S> = sum_r g_r . (S x_r) for every sample, without forming the gradients."""
        return self.per_sample_sum(((self.x @ s.T) * self.g).sum(1))


def _rows_of(cap: _Captured, batch: SeqBatch) -> dict[str, torch.Tensor]:
    """The target positions of a batch as rows (row-major order: each sample's rows are contiguous)."""
    mask = batch.positives > 0
    k = mask.sum(1, keepdim=True).clamp_min(1).to(cap.x.dtype).expand_as(mask)
    return {"x": cap.x[mask], "resid": cap.extra[mask], "pos": batch.positives[mask],
            "neg": batch.negatives[mask], "weight": 1.0 / k[mask], "g": cap.g[mask]}


def _row_offsets(ds: RecDataset, samples: np.ndarray, max_len: int) -> np.ndarray:
    """start[j] = first row of sample j; sample j has k_j = min(len(line) - 1, max_len) rows."""
    k = np.asarray([min(len(ds.train[int(u)]) - 1, max_len) for u in samples], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(k)]).astype(np.int64)


class _RowModel:
    """The loss downstream of theta, row by row, for theta = the last block's attention output. Mirrors
    CausalSelfAttention.forward, Block.forward and bce_terms in eval mode; `_HessianBuilder` checks it
    against the real model before it is used."""

    def __init__(self, model: nn.Module, layer: nn.Linear) -> None:
        mods = self.modules_for(model, layer)
        if mods is None:
            raise ValueError("the row model needs theta = the last block's attention output")
        self.attention, self.ffn = mods
        self.layer, self.emb = layer, model.item_embeddings

    @staticmethod
    def modules_for(model: nn.Module, layer: nn.Linear) -> tuple[nn.Module, nn.Module] | None:
        """(attention module, feed-forward) when `layer` is the last block's attention output."""
        try:
            block = model.blocks[-1]
            if block.attention.dense is layer:
                return block.attention, block.ffn
        except (AttributeError, IndexError, TypeError):
            pass
        return None

    def out(self, rows: "_Rows", idx: slice | torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output rows out_r = W x_r + b (W = theta unless given)."""
        return F.linear(rows.x[idx], self.layer.weight if w is None else w, self.layer.bias)

    def terms_from_out(self, out: torch.Tensor, resid: torch.Tensor, pos: torch.Tensor,
                       neg: torch.Tensor) -> torch.Tensor:
        """Per-row BCE as a function of the layer's output rows."""
        hidden = self.ffn(self.attention.norm(out + resid))
        emb = self.emb.weight
        return F.softplus(-(hidden * emb[pos]).sum(-1)) + F.softplus((hidden * emb[neg]).sum(-1))

    def loss(self, w: torch.Tensor, rows: "_Rows", idx: slice | torch.Tensor,
             row_weight: torch.Tensor) -> torch.Tensor:
        """sum_r row_weight_r * term_r(W) over the rows idx."""
        terms = self.terms_from_out(self.out(rows, idx, w), rows.resid[idx], rows.pos[idx], rows.neg[idx])
        return (terms * row_weight).sum()

    def sample_losses(self, rows: "_Rows") -> torch.Tensor:
        """l(z) of every sample of `rows` (one per segment of `rows.start`)."""
        with torch.no_grad():
            terms = self.terms_from_out(self.out(rows, slice(None)), rows.resid, rows.pos, rows.neg) * rows.weight
        return rows.per_sample_sum(terms)

    def hessians_autograd(self, rows: "_Rows", idx: slice | torch.Tensor) -> torch.Tensor:
        """A_r = d^2 term_r / d out_r^2, (rows, out, out), by double backward, one output direction at a
        time (rows are independent, so each backward gives that Hessian row for all rows at once)."""
        with torch.enable_grad():
            out = self.out(rows, idx).detach().requires_grad_(True)
            terms = self.terms_from_out(out, rows.resid[idx], rows.pos[idx], rows.neg[idx])
            (g,) = torch.autograd.grad(terms.sum(), out, create_graph=True)
            cols = [torch.autograd.grad(g[:, k].sum(), out, retain_graph=True)[0] for k in range(out.shape[1])]
        return torch.stack(cols, 1).detach()

    @torch.no_grad()
    def curvature(self, rows: "_Rows", idx: slice | torch.Tensor) -> "_Curvature":
        """Everything A_r t needs for the rows idx (forward and backward quantities at theta)."""
        norm1, ffn = self.attention.norm, self.ffn
        yh1, sig1 = _ln_forward(self.out(rows, idx) + rows.resid[idx], norm1.eps)
        n = yh1 * norm1.weight + norm1.bias
        z1 = F.linear(n, ffn.fc1.weight, ffn.fc1.bias)
        pdf = torch.exp(-0.5 * z1 * z1) * (1.0 / math.sqrt(2.0 * math.pi))
        cdf = 0.5 * (1.0 + torch.erf(z1 * (1.0 / math.sqrt(2.0))))
        g1, g2 = cdf + z1 * pdf, pdf * (2.0 - z1 * z1)  # gelu' and gelu'' (exact, erf-based GELU)
        yh2, sig2 = _ln_forward(F.linear(z1 * cdf, ffn.fc2.weight, ffn.fc2.bias) + n, ffn.norm.eps)
        h = yh2 * ffn.norm.weight + ffn.norm.bias
        e_pos, e_neg = self.emb.weight[rows.pos[idx]], self.emb.weight[rows.neg[idx]]
        s_pos = torch.sigmoid((h * e_pos).sum(-1, keepdim=True))
        s_neg = torch.sigmoid((h * e_neg).sum(-1, keepdim=True))
        u2 = ffn.norm.weight * (-(1.0 - s_pos) * e_pos + s_neg * e_neg)  # gamma2 * dterm/dh
        dy = _ln_jac(yh2, sig2, u2)
        dz = dy @ ffn.fc2.weight                                          # W2^T dy
        u1 = norm1.weight * (dy + (dz * g1) @ ffn.fc1.weight)             # gamma1 * dterm/dn
        j_pos, j_neg = _ln_jac(yh2, sig2, ffn.norm.weight * e_pos), _ln_jac(yh2, sig2, ffn.norm.weight * e_neg)
        return _Curvature(
            ln1=_LNState.build(yh1, sig1, u1), ln2=_LNState.build(yh2, sig2, u2),
            g1=g1.unsqueeze(1), dz_g2=(dz * g2).unsqueeze(1),
            j_pos=j_pos.unsqueeze(1), cj_pos=(j_pos * s_pos * (1.0 - s_pos)).unsqueeze(1),
            j_neg=j_neg.unsqueeze(1), cj_neg=(j_neg * s_neg * (1.0 - s_neg)).unsqueeze(1),
            gamma1=norm1.weight.detach(), w1=ffn.fc1.weight.detach(), w2=ffn.fc2.weight.detach())


def _slice_fields(obj: object, sl: slice, shared: tuple[str, ...] = ()) -> dict:
    """The dataclass fields of `obj` sliced along rows, except the `shared` (not per-row) ones."""
    out = {}
    for name in obj.__dataclass_fields__:
        value = getattr(obj, name)
        out[name] = value if name in shared else value[sl]
    return out


@dataclass
class _LNState:
    """A LayerNorm at each row, shaped (rows, 1, d) / (rows, 1, 1) to broadcast over m directions per row:
    yhat, 1/sigma, and the upstream-gradient terms of its curvature (u = gamma * upstream gradient)."""

    yhat: torch.Tensor
    yhat_d: torch.Tensor     # yhat / d
    inv_sigma: torch.Tensor
    pu: torch.Tensor         # P u
    s: torch.Tensor          # u . yhat
    s3: torch.Tensor         # 3 (u . yhat)
    coef: torch.Tensor       # -1 / (d sigma^2)

    @classmethod
    def build(cls, yhat: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor) -> "_LNState":
        d = yhat.shape[-1]
        pu = u - u.mean(-1, keepdim=True)
        s = (yhat * u).sum(-1, keepdim=True)
        return cls(yhat=yhat.unsqueeze(1), yhat_d=(yhat / d).unsqueeze(1), inv_sigma=(1.0 / sigma).unsqueeze(1),
                   pu=pu.unsqueeze(1), s=s.unsqueeze(1), s3=(3.0 * s).unsqueeze(1),
                   coef=(-1.0 / (d * sigma * sigma)).unsqueeze(1))

    def __getitem__(self, sl: slice) -> "_LNState":
        return _LNState(**_slice_fields(self, sl))

    def jac(self, v: torch.Tensor) -> torch.Tensor:
        """Jhat v = (P - yhat yhat^T / d) v / sigma (Jhat = d yhat / d a, symmetric), v (rows, m, d)."""
        return (v - v.mean(-1, keepdim=True) - self.yhat * (self.yhat_d * v).sum(-1, keepdim=True)) * self.inv_sigma

    def curv(self, v: torch.Tensor) -> torch.Tensor:
        """T v, T = hess_a (u . yhat(a)) = -(Pu yhat^T + yhat Pu^T + s (P - 3 yhat yhat^T / d)) / (d sigma^2)."""
        yv = (self.yhat * v).sum(-1, keepdim=True)
        pv = (self.pu * v).sum(-1, keepdim=True)
        yv_d = (self.yhat_d * v).sum(-1, keepdim=True)
        out = self.pu * yv + self.yhat * (pv - self.s3 * yv_d) + self.s * (v - v.mean(-1, keepdim=True))
        return out * self.coef


@dataclass
class _Curvature:
    """Per-row quantities of term = phi(LN2(FFN(LN1(out + resid)))) at theta, from which A_r t (the
    row's Hessian w.r.t. out_r applied to t_r) is a few small vector operations:

        A t = J1^T [ JF^T (J2^T Hphi J2 + T2) JF + W1^T diag(gelu''(z) * W2^T dy) W1 ] J1 t + T1 t

    J1 = diag(gamma1) Jhat1, JF = I + W2 diag(gelu'(z)) W1 (the feed-forward with its residual) and J2
    the Jacobians; Hphi = c_pos e_pos e_pos^T + c_neg e_neg e_neg^T the BCE's curvature w.r.t. the
    hidden state, so J2^T Hphi J2 = c_pos j_pos j_pos^T + ... with j = J2^T e precomputed; T1, T2 the
    LayerNorms' curvature contracted with their upstream gradients (`_LNState.curv`). Checked against
    autograd before use (`LossHessian`)."""

    ln1: _LNState
    ln2: _LNState
    g1: torch.Tensor         # (rows, 1, ff) gelu'(z)
    dz_g2: torch.Tensor      # (rows, 1, ff) (W2^T dy) * gelu''(z)
    j_pos: torch.Tensor      # (rows, 1, d)
    cj_pos: torch.Tensor     # (rows, 1, d) c_pos * j_pos
    j_neg: torch.Tensor
    cj_neg: torch.Tensor
    gamma1: torch.Tensor     # shared by all rows
    w1: torch.Tensor
    w2: torch.Tensor

    def __getitem__(self, sl: slice) -> "_Curvature":
        return _Curvature(**_slice_fields(self, sl, shared=("gamma1", "w1", "w2")))

    @property
    def n_rows(self) -> int:
        return self.g1.shape[0]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """A_r t_r for directions t of shape (rows, m, out) (m directions per row)."""
        t_n = self.gamma1 * self.ln1.jac(t)                                # J1 t
        t_z = t_n @ self.w1.T                                              # W1 J1 t
        t_y = t_n + (self.g1 * t_z) @ self.w2.T                            # JF J1 t
        r_y = (self.ln2.curv(t_y) + self.j_pos * (self.cj_pos * t_y).sum(-1, keepdim=True)
               + self.j_neg * (self.cj_neg * t_y).sum(-1, keepdim=True))
        r_n = r_y + (self.g1 * (r_y @ self.w2) + self.dz_g2 * t_z) @ self.w1
        return self.ln1.jac(self.gamma1 * r_n) + self.ln1.curv(t)


def _ln_forward(a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised rows yhat = (a - mean) / sigma and sigma (rows, 1) of a LayerNorm (biased variance)."""
    c = a - a.mean(-1, keepdim=True)
    sigma = torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    return c / sigma, sigma


def _ln_jac(yhat: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Jhat v for rows (rows, d): (P - yhat yhat^T / d) v / sigma."""
    d = v.shape[-1]
    return (v - v.mean(-1, keepdim=True) - yhat * ((yhat * v).sum(-1, keepdim=True) / d)) / sigma


class LossHessian:
    """Hessian-vector products (and the dense Hessian) of the mean loss R over a fixed set of samples,
    restricted to theta. The fast path (theta = the last block's attention output, checked numerically)
    works on cached rows, with the rows' curvature in closed form (checked against autograd; else
    autograd on the rows); the generic path runs the full model for every product. A snapshot at the
    current theta: rebuild it if the model changes."""

    def __init__(self, model: nn.Module, layer: nn.Linear, samples: np.ndarray, batch_size: int,
                 rows: _Rows | None = None, generic_batch: SeqBatch | None = None,
                 closed_form: bool | None = None) -> None:
        if (rows is None) == (generic_batch is None):
            raise ValueError("give exactly one of rows (fast path) and generic_batch (generic path)")
        self.model, self.layer, self.samples, self.batch_size = model, layer, samples, batch_size
        self.rows, self._batch = rows, generic_batch
        self._row_model = _RowModel(model, layer) if rows is not None else None
        self.closed_form = False
        if rows is not None and closed_form is not False:
            self.closed_form = self._closed_form_matches()
            if closed_form and not self.closed_form:
                raise ValueError("the closed-form row curvature does not match autograd for this model")

    @classmethod
    def from_model(cls, model: nn.Module, ds: RecDataset, negatives: Sequence[np.ndarray], layer: nn.Linear,
                   users: Sequence[int] | None = None, batch_size: int = 1024,
                   device: torch.device | str = "cpu", fast: bool | None = None,
                   closed_form: bool | None = None) -> "LossHessian":
        """Build it with its own pass over the samples that have a loss (among `users` if given).
        fast / closed_form: None = use when it applies, True = insist, False = don't."""
        _check_eval(model)
        builder = _HessianBuilder(model, ds, negatives, layer, samples_with_loss(ds, users), batch_size,
                                  device, fast)
        if builder.fast:
            for start in range(0, builder.n, batch_size):
                part = builder.samples[start:start + batch_size]
                batch = _make_batch(ds, part, _max_len(model), negatives, device)
                builder.add(part, batch, _forward_backward(model, layer, batch, builder.extra_module))
                if not builder.fast:  # the row model did not match: nothing more to collect
                    break
        return builder.build(closed_form)

    @property
    def fast(self) -> bool:
        return self.rows is not None

    @property
    def n(self) -> int:
        return len(self.samples)

    def _closed_form_matches(self, n_check: int = 16) -> bool:
        """Whether the closed-form A_r equals autograd's on the first rows (a structural check)."""
        sl = slice(0, min(n_check, self.rows.x.shape[0]))
        try:
            mine = self._row_hessians(sl, closed_form=True)
        except (AttributeError, RuntimeError, TypeError) as exc:  # e.g. a changed FeedForward
            logger.warning("closed-form row curvature unavailable (%s); using autograd on the rows", exc)
            return False
        ref = self._row_hessians(sl, closed_form=False)
        if bool((mine - ref).abs().max() <= 1e-3 * ref.abs().max().clamp_min(1e-12)):
            return True
        logger.warning("closed-form row curvature disagrees with autograd; using autograd on the rows (slower)")
        return False

    def _row_hessians(self, idx: slice | torch.Tensor, closed_form: bool) -> torch.Tensor:
        """A_r, (rows, out, out), for the rows idx."""
        if not closed_form:
            return self._row_model.hessians_autograd(self.rows, idx)
        curv = self._row_model.curvature(self.rows, idx)
        n_out = self.layer.weight.shape[0]
        eye = torch.eye(n_out, dtype=curv.g1.dtype, device=curv.g1.device)
        with torch.no_grad():
            return curv.apply(eye.expand(curv.n_rows, n_out, n_out))  # A symmetric: rows = columns

    def _rows_hvp(self, idx: slice | torch.Tensor, row_weight: torch.Tensor, vec: torch.Tensor,
                  curv: _Curvature | None = None) -> torch.Tensor:
        """sum_r row_weight_r (A_r (vec x_r)) x_r^T over the rows idx = d/dW <grad of the weighted loss, vec>."""
        if not self.closed_form:
            with torch.enable_grad():
                w = self.layer.weight.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._row_model.loss(w, self.rows, idx, row_weight), w, create_graph=True)
                (hv,) = torch.autograd.grad((g * vec).sum(), w)
            return hv
        x = self.rows.x[idx]
        if curv is None:
            curv = self._row_model.curvature(self.rows, idx)
        with torch.no_grad():
            a_t = curv.apply((x @ vec.T).unsqueeze(1)).squeeze(1)
            return (a_t * row_weight.unsqueeze(1)).T @ x

    def _generic_batch(self, idx: np.ndarray | torch.Tensor) -> SeqBatch:
        b = self._batch
        part = torch.as_tensor(idx, device=b.inputs.device)
        return SeqBatch(b.inputs[part], b.positives[part], b.negatives[part])

    def _row_chunk(self, per_row: int) -> int:
        """Rows per chunk so that a (rows, per_row) fp32 temporary stays <= 16 MB."""
        return max(1, min(_ROW_CHUNK, (1 << 22) // per_row))

    # -- public products -------------------------------------------------------------------------
    def sample_hvp(self, idx: np.ndarray, vec: torch.Tensor) -> torch.Tensor:
        """(1/|idx|) sum_{j in idx} H_{z_j} vec, idx = positions in `self.samples` (repeats allowed)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if self.rows is None:
            return hvp(self.model, self._generic_batch(idx), self.layer, vec)
        st = self.rows.start
        rows = torch.as_tensor(np.concatenate([np.arange(st[j], st[j + 1]) for j in idx]), device=vec.device)
        return self._rows_hvp(rows, self.rows.weight[rows] / len(idx), vec)

    def full_hvp(self, vec: torch.Tensor) -> torch.Tensor:
        """H vec with H the Hessian of R, the mean loss over all samples."""
        total = torch.zeros_like(vec)
        if self.rows is None:
            for start in range(0, self.n, self.batch_size):
                part = np.arange(start, min(start + self.batch_size, self.n))
                total += self.sample_hvp(part, vec) * (len(part) / self.n)
            return total
        n_rows = int(self.rows.start[-1])
        for start in range(0, n_rows, _ROW_CHUNK):
            sl = slice(start, min(start + _ROW_CHUNK, n_rows))
            total += self._rows_hvp(sl, self.rows.weight[sl] / self.n, vec)
        return total

    def step_operators(self, draws: np.ndarray) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """For each row of `draws` (steps x batch sample positions), the operator h -> mean_j H_{z_j} h.

        LiSSA evaluates every H_z at the same theta, only the vector changes. With the closed form we
        compute the curvature of the rows of a chunk of upcoming steps in one vectorised call, and each
        step is then a handful of small products on its own rows. Otherwise: `sample_hvp` per step."""
        draws = np.asarray(draws, dtype=np.int64).reshape(len(draws), -1)
        if not self.closed_form:
            for d in draws:
                yield lambda h, d=d: self.sample_hvp(d, h)
            return
        st, r = self.rows.start, self.rows
        per_step = (st[draws + 1] - st[draws]).sum(1)
        budget = _ROW_CHUNK
        k = 0
        while k < len(draws):
            end, total = k, 0
            while end < len(draws) and (end == k or total + per_step[end] <= budget):
                total += int(per_step[end])
                end += 1
            idx = torch.as_tensor(np.concatenate([np.arange(st[j], st[j + 1]) for d in draws[k:end] for j in d]),
                                  device=r.x.device)
            curv = self._row_model.curvature(r, idx)
            x, w = r.x[idx], r.weight[idx] / draws.shape[1]
            bounds = np.concatenate([[0], np.cumsum(per_step[k:end])]).tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                sl = slice(lo, hi)
                yield lambda h, c=curv[sl], xs=x[sl], ws=w[sl]: _apply_rows(c, xs, ws, h)
            k = end

    def dense(self, progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """The (out*in x out*in) Hessian of R w.r.t. vec(W) (row-major, as W.reshape(-1)), float64."""
        return self._dense_rows(progress, cancel) if self.rows is not None else self._dense_generic(progress, cancel)

    def _dense_rows(self, progress: Progress | None, cancel: Cancel | None) -> torch.Tensor:
        """H = sum_r (w_r / n) A_r (x) x_r x_r^T as ONE matrix product per chunk of rows:
        m[(k, j), (a, b)] = sum_r w_r A_r[k, j] x_ra x_rb, then H[(k, a), (j, b)] = m[(k, j), (a, b)]."""
        r = self.rows
        n_out, n_in = self.layer.weight.shape
        n_rows = int(r.start[-1])
        m = torch.zeros(n_out * n_out, n_in * n_in, dtype=torch.float64, device=r.x.device)
        chunk = self._row_chunk(max(n_out, n_in) ** 2)
        for start in range(0, n_rows, chunk):
            _poll(cancel)
            sl = slice(start, min(start + chunk, n_rows))
            a = self._row_hessians(sl, self.closed_form) * (r.weight[sl] / self.n).view(-1, 1, 1)
            x = r.x[sl]
            q = (x.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, n_in * n_in)
            m += (a.reshape(-1, n_out * n_out).T @ q).double()
            if progress is not None:
                progress(sl.stop / n_rows, "dense Hessian")
        h = m.view(n_out, n_out, n_in, n_in).permute(0, 2, 1, 3).reshape(n_out * n_in, n_out * n_in)
        return 0.5 * (h + h.T)  # exact symmetry (the two triangles differ by rounding only)

    def _dense_generic(self, progress: Progress | None, cancel: Cancel | None) -> torch.Tensor:
        """Column blocks of Hessian-vector products through the whole model (slow; other layers only)."""
        w = self.layer.weight
        n_par = w.numel()
        h = torch.zeros(n_par, n_par, dtype=torch.float64, device=w.device)
        cols = min(n_par, 256)
        n_batches = math.ceil(self.n / self.batch_size)
        for i, start in enumerate(range(0, self.n, self.batch_size)):
            _poll(cancel)
            batch = self._generic_batch(np.arange(start, min(start + self.batch_size, self.n)))
            with _theta_only(self.model, self.layer), torch.enable_grad():
                (g,) = torch.autograd.grad(per_sample_loss(self.model, batch).sum() / self.n, w, create_graph=True)
                for c in range(0, n_par, cols):
                    width = min(cols, n_par - c)
                    basis = torch.zeros(width, n_par, dtype=w.dtype, device=w.device)
                    basis[:, c:c + width] = torch.eye(width, dtype=w.dtype, device=w.device)
                    (block,) = torch.autograd.grad(g, w, grad_outputs=basis.view(width, *w.shape),
                                                   is_grads_batched=True, retain_graph=True)
                    h[c:c + width] += block.reshape(width, n_par).double()
            if progress is not None:
                progress((i + 1) / n_batches, "dense Hessian")
        return 0.5 * (h + h.T)


def _apply_rows(curv: _Curvature, x: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum_r w_r (A_r (h x_r)) x_r^T: one LiSSA step's Hessian product on its own rows."""
    with torch.no_grad():
        return (curv.apply((x @ h.T).unsqueeze(1)).squeeze(1) * w.unsqueeze(1)).T @ x


class _HessianBuilder:
    """Collects, batch by batch during a pass over the samples (in order), what `LossHessian` needs:
    the rows of the fast path, after checking on the first batch that the row model reproduces the
    real model's per-sample losses. The generic path needs nothing from the pass."""

    def __init__(self, model: nn.Module, ds: RecDataset, negatives: Sequence[np.ndarray], layer: nn.Linear,
                 samples: np.ndarray, batch_size: int, device: torch.device | str, fast: bool | None) -> None:
        if len(samples) == 0:
            raise ValueError("no user has a transition (>= 2 training items)")
        self.model, self.ds, self.negatives, self.layer = model, ds, negatives, layer
        self.samples, self.batch_size, self.device = samples, batch_size, device
        mods = _RowModel.modules_for(model, layer)
        if fast and mods is None:
            raise ValueError("the fast path needs theta = the last block's attention output")
        self.fast = mods is not None and fast is not False
        self._insist = bool(fast)
        self.extra_module = mods[0] if self.fast else None
        self._parts: list[dict[str, torch.Tensor]] = []
        self._seen = 0

    @property
    def n(self) -> int:
        return len(self.samples)

    def add(self, users: np.ndarray, batch: SeqBatch, cap: _Captured) -> None:
        if not self.fast:
            return
        if not np.array_equal(users, self.samples[self._seen:self._seen + len(users)]):
            raise ValueError("batches must follow the sample order")
        part = _rows_of(cap, batch)
        if self._seen == 0 and not self._row_model_matches(users, part, cap.losses):
            if self._insist:
                raise ValueError("the row model does not reproduce the surrogate's loss (fast=True)")
            logger.warning("the row model does not reproduce the surrogate's loss; falling back to the "
                           "generic (full-model) Hessian products")
            self.fast, self.extra_module, self._parts = False, None, []
            return
        self._parts.append(part)
        self._seen += len(users)

    def _row_model_matches(self, users: np.ndarray, part: dict[str, torch.Tensor], losses: torch.Tensor) -> bool:
        start = _row_offsets(self.ds, users, _max_len(self.model))
        if int(start[-1]) != part["x"].shape[0]:
            return False
        rows = _Rows(part["x"], part["resid"], part["pos"], part["neg"], part["weight"], start)
        mine = _RowModel(self.model, self.layer).sample_losses(rows)
        return bool(torch.allclose(mine, losses, rtol=1e-4, atol=1e-6))

    def build(self, closed_form: bool | None = None) -> LossHessian:
        if self.fast:
            if self._seen != self.n:
                raise ValueError("the pass did not cover every sample")
            cat = {key: torch.cat([p[key] for p in self._parts]) for key in self._parts[0]}
            rows = _Rows(cat["x"], cat["resid"], cat["pos"], cat["neg"], cat["weight"],
                         _row_offsets(self.ds, self.samples, _max_len(self.model)), g=cat["g"])
            if int(rows.start[-1]) != rows.x.shape[0]:
                raise AssertionError("row offsets do not match the cached rows")
            return LossHessian(self.model, self.layer, self.samples, self.batch_size, rows=rows,
                               closed_form=closed_form)
        batch = _make_batch(self.ds, self.samples, _max_len(self.model), self.negatives, self.device)
        return LossHessian(self.model, self.layer, self.samples, self.batch_size, generic_batch=batch)


# ----------------------------------------------------------------------------------------------
# Solvers for s = (H + lambda I)^-1 v


def _poll(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("influence computation cancelled")


class SampleHessians(Protocol):
    """What LiSSA needs: the number of samples and, for a sequence of draws, one operator per step."""

    n: int

    def step_operators(self, draws: np.ndarray) -> Iterable[Callable[[torch.Tensor], torch.Tensor]]: ...


def lissa(v: torch.Tensor, hessians: SampleHessians, *, steps: int, damping: float, scale: float, seed: int,
          batch: int = 1, progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
    """The reference recursion h <- v + (1 - damping) h - (H_z h) / scale from h = v, with `batch` random
    samples (uniform, seeded, with replacement) per step; returns h / scale, an estimate of
    (H + scale * damping * I)^-1 v (module docstring). Raises SolverDiverged when h stops being finite
    or grows without bound (H + scale * damping * I not positive definite, or scale too small)."""
    draws = np.random.default_rng(seed).integers(0, hessians.n, size=(steps, batch))
    v = v.detach()
    h = v.clone()
    # |h*| <= scale |v| / lambda_min(H + lambda I); far beyond that (or non-finite) means divergence.
    limit = 1e6 * (float(v.norm()) + 1e-30) / max(damping, 1e-12)
    every = max(1, steps // 100)
    for k, op in enumerate(hessians.step_operators(draws)):
        hv = op(h)
        with torch.no_grad():
            h = v + (1.0 - damping) * h - hv / scale
        if (k + 1) % _LISSA_CHECK_EVERY == 0 or k + 1 == steps:
            norm = float(h.norm())
            if not math.isfinite(norm) or norm > limit:
                raise SolverDiverged(
                    f"LiSSA diverged at step {k + 1} (|h| = {norm:.3g}): H + {scale * damping:g} I is not positive "
                    "definite or `scale` is below half the largest eigenvalue of H_z; raise damping or scale, or "
                    "use solver='direct'")
        if (k + 1) % every == 0:
            _poll(cancel)
            if progress is not None:
                progress((k + 1) / steps, f"LiSSA step {k + 1}/{steps}")
    return h / scale


def conjugate_gradient(v: torch.Tensor, full_hvp: Callable[[torch.Tensor], torch.Tensor], *, damping: float,
                       max_iter: int, tol: float, progress: Progress | None = None,
                       cancel: Cancel | None = None) -> tuple[torch.Tensor, dict]:
    """Solve (H + damping I) s = v by conjugate gradients (vectors in float64, products in v's dtype),
    until |residual| <= tol |v| or max_iter. On a direction of negative curvature (H + damping I not
    positive definite) it stops, logs a warning and returns the iterate so far. Returns (s, info)."""
    dtype = v.dtype
    b = v.reshape(-1).double()
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    target = tol * math.sqrt(float(b @ b))
    info = {"iterations": 0, "converged": math.sqrt(rs) <= target, "negative_curvature": False,
            "relative_residual": 1.0}
    for it in range(max_iter):
        if info["converged"]:
            break
        _poll(cancel)
        ap = full_hvp(p.to(dtype).view_as(v)).reshape(-1).double() + damping * p
        pap = float(p @ ap)
        if pap <= 0.0:
            info["negative_curvature"] = True
            logger.warning("CG met negative curvature at iteration %d (p^T (H + %g I) p = %.3g): the damped "
                           "Hessian is not positive definite; returning the iterate so far", it, damping, pap)
            break
        alpha = rs / pap
        x += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        info["iterations"] = it + 1
        info["relative_residual"] = math.sqrt(rs_new) / max(math.sqrt(float(b @ b)), 1e-300)
        if math.sqrt(rs_new) <= target:
            info["converged"] = True
        p = r + (rs_new / rs) * p
        rs = rs_new
        if progress is not None:
            progress((it + 1) / max_iter, f"CG iteration {it + 1}, residual {info['relative_residual']:.2e}")
    if not info["converged"] and not info["negative_curvature"]:
        logger.warning("CG stopped after %d iterations at relative residual %.2e (tol %.1e)",
                       info["iterations"], info["relative_residual"], tol)
    return x.to(dtype).view_as(v), info


def direct(v: torch.Tensor, hessian: torch.Tensor, *, damping: float) -> tuple[torch.Tensor, dict]:
    """Solve (H + damping I) s = v exactly in float64 from the dense Hessian (Cholesky when positive
    definite; otherwise, with a warning, a general LU solve: the system is solved anyway)."""
    a = hessian.double() + damping * torch.eye(hessian.shape[0], dtype=torch.float64, device=hessian.device)
    b = v.reshape(-1, 1).double()
    chol, status = torch.linalg.cholesky_ex(a)
    positive_definite = int(status) == 0
    if positive_definite:
        s = torch.cholesky_solve(b, chol)
    else:
        logger.warning("H + %g I is not positive definite; solving the indefinite system anyway", damping)
        s = torch.linalg.solve(a, b)
    return s.to(v.dtype).view_as(v), {"positive_definite": positive_definite}


# ----------------------------------------------------------------------------------------------
# The scores


def _el2n(model: nn.Module, hidden_last: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|softmax(scores over items 1..n) - onehot(target)|_2 = sqrt(|p|^2 - 2 p_y + 1), no one-hot built."""
    p = torch.softmax(hidden_last @ model.item_embeddings.weight[1:].T, dim=-1)
    p_y = p.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
    return ((p * p).sum(1) - 2.0 * p_y + 1.0).clamp_min(0.0).sqrt()


class _Stages:
    """Maps each stage's own 0..1 progress onto the overall 0..1 range, with weights per stage."""

    def __init__(self, progress: Progress | None, weights: dict[str, float]) -> None:
        self.progress, self.weights = progress, weights
        self.total = sum(weights.values())
        self.done = 0.0

    def stage(self, name: str) -> Progress:
        base, width = self.done, self.weights[name]
        self.done += width

        def report(fraction: float, message: str) -> None:
            if self.progress is not None:
                self.progress(min(1.0, (base + width * min(max(fraction, 0.0), 1.0)) / self.total), message)
        return report


def influence_scores(model: nn.Module, ds: RecDataset, cfg: InfluenceConfig, seed: int,
                     device: torch.device | str = "cpu", progress: Progress | None = None,
                     cancel: Cancel | None = None) -> dict:
    """Influence, GraNd and EL2N for every user 0..N-1 (numpy float64 arrays of length N).

    - influence[u] = <grad_theta l(z_u), s>, s from cfg.solver (all three solve (H + scale*damping I) s = v);
      0 for users without a transition.
    - grand[u] = |grad_theta l(z_u)|_F: GraNd restricted to theta (the paper's GraNd takes the norm over
      all parameters); 0 for users without a transition.
    - el2n[u] = |softmax over all items of the score at the last input position - onehot(last item)|_2,
      input = line[:-1]. A user with an empty history has no prediction to measure: he gets the mean
      EL2N of the others (a neutral value for ranking, neither easy nor hard).
    The model is copied (eval mode, moved to `device`): the caller's model is not touched. The negatives
    of each sample are one draw from `seed`, and LiSSA's sample order uses `seed` too: the same
    (model, ds, cfg, seed) gives the same scores. Also returned: `solver`, `seconds` per stage
    (gradients, solve, scores), `samples_with_loss`, `solver_info` (effective damping, fast path, CG
    iterations / direct's definiteness), and the norms of v and s.
    Raises `Cancelled` when `cancel()` returns True, `SolverDiverged` when LiSSA blows up."""
    times: dict[str, float] = {}
    # A private copy: eval mode, on `device`, no parameter requires grad (only theta, temporarily).
    model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    layer = model.influence_layer(cfg.parameter)
    n_users = ds.n_users
    max_len = _max_len(model)
    lam = effective_damping(cfg)
    negatives = fixed_negatives(ds, max_len, seed)
    samples = _by_length(ds, samples_with_loss(ds))
    builder = _HessianBuilder(model, ds, negatives, layer, samples, cfg.batch_size, device, None)
    # Rough relative costs of the stages, for one progress fraction across them.
    stages = _Stages(progress, {"gradients": 3.0, "solve": {"lissa": 0.5, "cg": 2.0, "direct": 6.0}[cfg.solver],
                                "scores": 0.05 if builder.fast else 2.0})

    # 1. One pass: v, GraNd, EL2N, and the rows (fast path) for the Hessian and the scores.
    t0 = time.perf_counter()
    report = stages.stage("gradients")
    v = torch.zeros_like(layer.weight)
    grand = torch.zeros(n_users, dtype=torch.float64, device=device)
    el2n = torch.zeros(n_users, dtype=torch.float64, device=device)
    for start in range(0, len(samples), cfg.batch_size):
        _poll(cancel)
        part = samples[start:start + cfg.batch_size]
        batch = _make_batch(ds, part, max_len, negatives, device)
        cap = _forward_backward(model, layer, batch, builder.extra_module)
        builder.add(part, batch, cap)
        grads = _grads_from(cap)
        v += grads.sum(0)
        idx = torch.as_tensor(part, device=device)
        grand[idx] = grads.flatten(1).norm(dim=1).double()
        with torch.no_grad():
            el2n[idx] = _el2n(model, cap.hidden[:, -1], batch.positives[:, -1]).double()
        report(min(start + cfg.batch_size, len(samples)) / len(samples), "per-sample gradients")
    v /= len(samples)
    hessian = builder.build()
    times["gradients"] = time.perf_counter() - t0

    # 2. s = (H + lambda I)^-1 v
    t0 = time.perf_counter()
    report = stages.stage("solve")
    solver_info: dict = {"effective_damping": lam, "fast_path": hessian.fast}
    if cfg.solver == "lissa":
        # `lissa_batch` is not an InfluenceConfig field (yet): 1 sample per step, as the reference.
        s = lissa(v, hessian, steps=cfg.lissa_steps, damping=cfg.damping, scale=cfg.scale, seed=seed,
                  batch=int(getattr(cfg, "lissa_batch", 1)), progress=report, cancel=cancel)
    elif cfg.solver == "cg":
        s, info = conjugate_gradient(v, hessian.full_hvp, damping=lam, max_iter=cfg.cg_max_iter, tol=cfg.cg_tol,
                                     progress=report, cancel=cancel)
        solver_info.update(info)
    else:
        dense = hessian.dense(progress=report, cancel=cancel)
        s, info = direct(v, dense, damping=lam)
        solver_info.update(info)
    times["solve"] = time.perf_counter() - t0

    # 3. influence(z) = <grad l(z), s>. The per-sample gradients are not kept (N x out x in floats: 800 MB
    #    on Games): the fast path has every sample's rows (x_r, g_r), the generic path makes a second pass.
    t0 = time.perf_counter()
    report = stages.stage("scores")
    influence = torch.zeros(n_users, dtype=torch.float64, device=device)
    if hessian.fast:
        with torch.no_grad():
            influence[torch.as_tensor(samples, device=device)] = hessian.rows.influence(s).double()
        report(1.0, "influence scores")
    else:
        done = 0
        for part, grads in per_sample_grads(model, ds, samples, negatives, layer, cfg.batch_size, device):
            _poll(cancel)
            influence[torch.as_tensor(part, device=device)] = torch.einsum("boi,oi->b", grads, s).double()
            done += len(part)
            report(done / len(samples), "influence scores")
    times["scores"] = time.perf_counter() - t0

    el2n_np = el2n.cpu().numpy()
    has_loss = np.zeros(n_users, dtype=bool)
    has_loss[samples] = True
    el2n_np[~has_loss] = el2n_np[has_loss].mean()
    return {
        "influence": influence.cpu().numpy(),
        "grand": grand.cpu().numpy(),
        "el2n": el2n_np,
        "solver": cfg.solver,
        "seconds": times,
        "samples_with_loss": int(len(samples)),
        "solver_info": solver_info,
        "v_norm": float(v.norm()),
        "s_norm": float(s.norm()),
    }
