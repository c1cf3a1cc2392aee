"""The fast path's rows (package docstring): every target position of every sample as one row, the loss
downstream of theta row by row (`_RowModel`, for theta = the last block's attention output) and the rows'
Hessians A_r in closed form (`_LNState`, `_Curvature`: LayerNorm, GELU feed-forward and BCE)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.data.dataset import RecDataset
from core.influence.grads import _Captured
from core.surrogate.batches import SeqBatch


@dataclass
class _Rows:
    """Every target position of every sample, as rows, for the fast path (package docstring). Rows of a
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

    def out(self, rows: _Rows, idx: slice | torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output rows out_r = W x_r + b (W = theta unless given)."""
        return F.linear(rows.x[idx], self.layer.weight if w is None else w, self.layer.bias)

    def terms_from_out(self, out: torch.Tensor, resid: torch.Tensor, pos: torch.Tensor,
                       neg: torch.Tensor) -> torch.Tensor:
        """Per-row BCE as a function of the layer's output rows."""
        hidden = self.ffn(self.attention.norm(out + resid))
        emb = self.emb.weight
        return F.softplus(-(hidden * emb[pos]).sum(-1)) + F.softplus((hidden * emb[neg]).sum(-1))

    def loss(self, w: torch.Tensor, rows: _Rows, idx: slice | torch.Tensor,
             row_weight: torch.Tensor) -> torch.Tensor:
        """sum_r row_weight_r * term_r(W) over the rows idx."""
        terms = self.terms_from_out(self.out(rows, idx, w), rows.resid[idx], rows.pos[idx], rows.neg[idx])
        return (terms * row_weight).sum()

    def sample_losses(self, rows: _Rows) -> torch.Tensor:
        """l(z) of every sample of `rows` (one per segment of `rows.start`)."""
        with torch.no_grad():
            terms = self.terms_from_out(self.out(rows, slice(None)), rows.resid, rows.pos, rows.neg) * rows.weight
        return rows.per_sample_sum(terms)

    def hessians_autograd(self, rows: _Rows, idx: slice | torch.Tensor) -> torch.Tensor:
        """A_r = d^2 term_r / d out_r^2, (rows, out, out), by double backward, one output direction at a
        time (rows are independent, so each backward gives that Hessian row for all rows at once)."""
        with torch.enable_grad():
            out = self.out(rows, idx).detach().requires_grad_(True)
            terms = self.terms_from_out(out, rows.resid[idx], rows.pos[idx], rows.neg[idx])
            (g,) = torch.autograd.grad(terms.sum(), out, create_graph=True)
            cols = [torch.autograd.grad(g[:, k].sum(), out, retain_graph=True)[0] for k in range(out.shape[1])]
        return torch.stack(cols, 1).detach()

    @torch.no_grad()
    def curvature(self, rows: _Rows, idx: slice | torch.Tensor) -> _Curvature:
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
    def build(cls, yhat: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor) -> _LNState:
        d = yhat.shape[-1]
        pu = u - u.mean(-1, keepdim=True)
        s = (yhat * u).sum(-1, keepdim=True)
        return cls(yhat=yhat.unsqueeze(1), yhat_d=(yhat / d).unsqueeze(1), inv_sigma=(1.0 / sigma).unsqueeze(1),
                   pu=pu.unsqueeze(1), s=s.unsqueeze(1), s3=(3.0 * s).unsqueeze(1),
                   coef=(-1.0 / (d * sigma * sigma)).unsqueeze(1))

    def __getitem__(self, sl: slice) -> _LNState:
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

    def __getitem__(self, sl: slice) -> _Curvature:
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
