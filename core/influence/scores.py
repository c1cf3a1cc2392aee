"""The scores (package docstring): `influence_scores` runs the stages (one pass for v, GraNd, EL2N and the
rows; one solve; the scores) on a private copy of the model."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from core.config import InfluenceConfig
from core.data.dataset import RecDataset
from core.influence.grads import _forward_backward, _grads_from, per_sample_grads
from core.influence.hessian import _HessianBuilder
from core.influence.loss import (
    Cancel,
    Progress,
    _by_length,
    _make_batch,
    _max_len,
    _poll,
    effective_damping,
    fixed_negatives,
    samples_with_loss,
)
from core.influence.solvers import conjugate_gradient, direct, lissa
from core.progress import Phases


def _el2n(model: nn.Module, hidden_last: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|softmax(scores over items 1..n) - onehot(target)|_2 = sqrt(|p|^2 - 2 p_y + 1), no one-hot built."""
    p = torch.softmax(hidden_last @ model.item_embeddings.weight[1:].T, dim=-1)
    p_y = p.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
    return ((p * p).sum(1) - 2.0 * p_y + 1.0).clamp_min(0.0).sqrt()


def influence_scores(model: nn.Module, ds: RecDataset, cfg: InfluenceConfig, seed: int,
                     device: torch.device | str = "cpu", progress: Progress | None = None,
                     cancel: Cancel | None = None) -> dict:
    """Influence, GraNd and EL2N for every sample 0..N-1, N = ds.n_samples (numpy float64 arrays).

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
    n_users = ds.n_samples  # users with a training sample come first
    max_len = _max_len(model)
    lam = effective_damping(cfg)
    negatives = fixed_negatives(ds, max_len, seed)
    samples = _by_length(ds, samples_with_loss(ds))
    builder = _HessianBuilder(model, ds, negatives, layer, samples, cfg.batch_size, device, None)
    # Rough relative costs of the stages, for one progress fraction across them.
    stages = Phases({"gradients": 3.0, "solve": {"lissa": 0.5, "cg": 2.0, "direct": 6.0}[cfg.solver],
                     "scores": 0.05 if builder.fast else 2.0})

    # 1. One pass: v, GraNd, EL2N, and the rows (fast path) for the Hessian and the scores.
    t0 = time.perf_counter()
    report = stages.reporter("gradients", progress)
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
    report = stages.reporter("solve", progress)
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
    report = stages.reporter("scores", progress)
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
