"""Per-sample gradients grad_W l(z) (package docstring): one forward and ONE backward per batch, then an einsum;
the reference's one-sample-at-a-time loop as a baseline; and v, their mean."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.data.dataset import RecDataset
from core.influence.loss import _by_length, _check_eval, _make_batch, _max_len, _theta_only, samples_with_loss
from core.surrogate.batches import SeqBatch, per_sample_loss


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
