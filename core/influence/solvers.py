"""Solvers for s = (H + lambda I)^-1 v (package docstring): LiSSA's recursion on sampled Hessians
(`SolverDiverged` when it blows up), conjugate gradients on full products, and a direct solve of the
dense Hessian."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import torch

from core.influence.loss import Cancel, Progress, _poll

logger = logging.getLogger(__name__)

# LiSSA checks for divergence (one device sync) every this many steps.
_LISSA_CHECK_EVERY = 250


class SolverDiverged(RuntimeError):
    """LiSSA's recursion blew up: H + damping*scale*I is not positive definite or scale is too small."""


class SampleHessians(Protocol):
    """What LiSSA needs: the number of samples and, for a sequence of draws, one operator per step."""

    n: int

    def step_operators(self, draws: np.ndarray) -> Iterable[Callable[[torch.Tensor], torch.Tensor]]: ...


def lissa(v: torch.Tensor, hessians: SampleHessians, *, steps: int, damping: float, scale: float, seed: int,
          batch: int = 1, progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
    """The reference recursion h <- v + (1 - damping) h - (H_z h) / scale from h = v, with `batch` random
    samples (uniform, seeded, with replacement) per step; returns h / scale, an estimate of
    (H + scale * damping * I)^-1 v (package docstring). Raises SolverDiverged when h stops being finite
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
