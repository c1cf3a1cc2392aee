"""Hessian-vector products of the mean loss R w.r.t. theta (package docstring): `hvp` through the whole
model (the generic path), `LossHessian` (products on the cached rows or through the model, LiSSA's step
operators, the dense Hessian) and `_HessianBuilder`, which collects the rows during a pass."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from core.data.dataset import RecDataset
from core.influence.grads import _Captured, _forward_backward
from core.influence.loss import (
    Cancel,
    Progress,
    _check_eval,
    _make_batch,
    _max_len,
    _poll,
    _theta_only,
    samples_with_loss,
)
from core.influence.rows import _Curvature, _row_offsets, _RowModel, _Rows, _rows_of
from core.surrogate.batches import SeqBatch, per_sample_loss

logger = logging.getLogger(__name__)

# Rows per chunk for full-data Hessian products on the fast path (bounds the double-backward graph).
_ROW_CHUNK = 16384


def hvp(model: nn.Module, batch: SeqBatch, layer: nn.Linear, vec: torch.Tensor) -> torch.Tensor:
    """H_batch vec, H_batch the Hessian w.r.t. W of the MEAN per-sample loss of `batch` (double backward).
    Runs the whole model: the generic path. `vec` has W's shape."""
    _check_eval(model)
    with _theta_only(model, layer), torch.enable_grad():
        loss = per_sample_loss(model, batch).mean()
        (g,) = torch.autograd.grad(loss, layer.weight, create_graph=True)
        (hv,) = torch.autograd.grad((g * vec).sum(), layer.weight)
    return hv


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
                   closed_form: bool | None = None) -> LossHessian:
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
