"""Per-sample effort scores: || d loss_z / d lora_B || for the LoRA B weight of one module (the
reference: v_proj of the last decoder layer), for padded batches, exactly.

How the work is kept near the cost of a forward pass:
- No parameter requires grad. A forward hook replaces the target module's output V with a leaf that
  does, so autograd records only the part of the graph after it (the last layer's attention, MLP,
  final norm) and the backward pass does nothing else.
- Per-sample gradients come from one backward of the summed losses: for a linear map
  out = B u, d loss_z / d B = sum_t g_t u_t^T, with g the gradient at the module output and u the
  module input, both captured per position (samples do not interact within a batch).
- The logits are never materialised whole: the cross-entropy and its gradient w.r.t. the final
  hidden states are computed in chunks of positions against the output embedding.
- The prompt prefix shared by every sample (the Alpaca header and instruction, ~40% of a Games
  prompt) is run once; its key/value cache is reused by every batch. The result stays exact: the
  cached last-layer values are a per-sample leaf (later tokens attend to them, so their gradient
  counts), and the prefix's own loss terms (identical for every sample) and their gradient are
  computed once and added to each sample.
- Batches are bucketed by length (sorted), so padding wastes almost nothing.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from core.effort.prompts import TokenizedSample

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


class EffortCancelled(Exception):
    pass


@dataclass
class EffortTarget:
    """Where the effort parameter lives, found through the module tree, not a name string (the
    reference's name match broke with newer peft versions)."""

    decoder: nn.Module  # the transformer body (embeddings, layers, final norm)
    lm_head: nn.Linear
    module: nn.Module  # the peft LoRA wrapper of the target projection
    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float
    layer_index: int


def find_target(peft_model, target_module: str = "v_proj", target_layer: int = -1) -> EffortTarget:
    base = peft_model.get_base_model()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError("the LLM has no `layers` list in its decoder; only decoder-only causal LMs are supported")
    index = target_layer % len(layers)
    layer = layers[index]
    for name, mod in layer.named_modules():
        if name.split(".")[-1] == target_module and hasattr(mod, "lora_B"):
            adapter = next(iter(mod.lora_B.keys()))
            return EffortTarget(decoder=decoder, lm_head=base.get_output_embeddings(), module=mod,
                                lora_A=mod.lora_A[adapter], lora_B=mod.lora_B[adapter],
                                scaling=float(mod.scaling[adapter]), layer_index=index)
    raise ValueError(f"no LoRA-wrapped module named '{target_module}' in decoder layer {index}")


_CACHE_KW = "cache" if "cache" in inspect.signature(
    __import__("transformers").models.llama.modeling_llama.LlamaModel.forward).parameters else "past_key_values"


@dataclass
class _Capture:
    """Hooks that expose the target module's output as a grad-requiring leaf and record the input
    of lora_B (u = A x) at every position."""

    target: EffortTarget
    v_out: list = field(default_factory=list)
    u_in: list = field(default_factory=list)
    handles: list = field(default_factory=list)

    def __enter__(self) -> _Capture:
        def on_output(_mod, _inp, out):
            leaf = out.detach().requires_grad_(True)
            self.v_out.append(leaf)
            return leaf

        def on_lora_b_input(_mod, inp):
            self.u_in.append(inp[0].detach())

        self.handles = [self.target.module.register_forward_hook(on_output),
                        self.target.lora_B.register_forward_pre_hook(on_lora_b_input)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class _Fp32Head:
    """fp32 copy of the output head (which may be tied to the input embeddings, and those may
    be cast to bf16): the logits and their softmax are always fp32."""

    def __init__(self, head: nn.Linear) -> None:
        self.weight = head.weight.detach().float()
        self.bias = head.bias.detach().float() if head.bias is not None else None


def chunked_ce_grad(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, head,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy (b,) and its gradient w.r.t. `hidden` (b, t, d), over the
    positions where `mask` is set, without holding the (positions x vocabulary) logits at once.
    Logits and softmax are computed in fp32 whatever the hidden dtype."""
    b, t, d = hidden.shape
    flat_mask = mask.reshape(-1)
    rows = hidden.reshape(-1, d)[flat_mask]
    ys = targets.reshape(-1)[flat_mask]
    owner = torch.arange(b, device=hidden.device).repeat_interleave(t)[flat_mask]
    w32 = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    sums = torch.zeros(b, dtype=torch.float32, device=hidden.device)
    grad_rows = torch.empty(rows.shape[0], d, dtype=torch.float32, device=hidden.device)
    for s in range(0, rows.shape[0], chunk):
        # torch's own cross-entropy and its backward: a hand-written softmax-minus-one-hot was measured
        # ~50x less accurate against float64 (9e-5 vs 1e-6 relative on SmolLM2's effort norms).
        h = rows[s:s + chunk].float().detach().requires_grad_(True)
        with torch.enable_grad():
            logits = h @ w32.T
            if bias is not None:
                logits = logits + bias
            ce = torch.nn.functional.cross_entropy(logits, ys[s:s + chunk], reduction="none")
            (g,) = torch.autograd.grad(ce.sum(), [h])
        sums.index_add_(0, owner[s:s + chunk], ce.detach())
        grad_rows[s:s + chunk] = g
    grad = torch.zeros(b * t, d, dtype=torch.float32, device=hidden.device)
    grad[flat_mask] = grad_rows
    return sums, grad.view(b, t, d)


@dataclass(frozen=True)
class EffortSettings:
    cache_prefix: bool = True
    max_batch_tokens: int = 1024
    max_batch_size: int = 64
    logits_chunk: int = 1024
    # "bf16": the layers before the target one run in bfloat16 without grad (most of the
    # forward); the target layer, the layers after it, the final norm and the output head stay fp32.
    precision: str = "fp32"
    # "prompt": the loss over every token of the prompt (the reference); "response": over the response
    # tokens only (from each sample's `response_from`: the target title and EOS).
    loss: str = "prompt"
    # The most prefix tokens shared and cached (None: the pool's longest common prefix). Set from the
    # prompt template, it makes the prefix the same whatever the pool, so a sample's score does not
    # depend on which other samples it was scored with (the per-sample store relies on that).
    prefix_tokens: int | None = None


def _to_fp32(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    if isinstance(x, tuple):
        return tuple(_to_fp32(y) for y in x)
    return x


def cast_frozen_layers(target: EffortTarget, dtype: torch.dtype) -> list:
    """Run the embeddings and the layers before the target layer in `dtype`; keep the rest fp32.
    The output head is computed from a separate fp32 copy (it may be tied to the embeddings), so
    this returns nothing to undo but the hook handles."""
    decoder = target.decoder
    for i, layer in enumerate(decoder.layers):
        if i < target.layer_index:
            layer.to(dtype)
    decoder.get_input_embeddings().to(dtype)

    def upcast(_mod, args, kwargs):
        return _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}

    return [decoder.layers[target.layer_index].register_forward_pre_hook(upcast, with_kwargs=True)]


class EffortScorer:
    """Computes effort scores for tokenised samples with a peft-wrapped causal LM."""

    def __init__(self, peft_model, target: EffortTarget, settings: EffortSettings, device: torch.device,
                 eos_id: int) -> None:
        self.model = peft_model
        self.t = target
        self.s = settings
        self.device = device
        self.pad_id = eos_id
        self.head = _Fp32Head(target.lm_head)
        if settings.precision == "bf16":
            cast_frozen_layers(target, torch.bfloat16)

    # -- prefix ---------------------------------------------------------------------------------
    def _prefix(self, samples: Sequence[TokenizedSample]):
        """Shared prefix: the longest common token prefix of all samples, minus its last token
        (so every sample keeps at least one token of its own and every cached position's loss
        term predicts a shared token). Returns (cache tensors, const grad (out, r), const loss
        count, length)."""
        if not self.s.cache_prefix or not samples:
            return None, None, 0
        first = samples[0].ids
        n = min(len(x.ids) for x in samples)
        common = n
        for x in samples:
            ids = x.ids
            k = 0
            while k < common and ids[k] == first[k]:
                k += 1
            common = k
        length = common - 1
        if self.s.prefix_tokens is not None:
            length = min(length, self.s.prefix_tokens)
        if self.s.loss == "response":
            # Every response loss term must lie in the sample's own part (after the cached prefix).
            length = min(length, min(x.response_from for x in samples) - 1)
        if length < 2:
            return None, None, 0
        ids = torch.tensor([first[:length + 1]], device=self.device)
        with _Capture(self.t) as cap, torch.enable_grad():
            out = self.t.decoder(input_ids=ids[:, :length], use_cache=True)
            hidden = out.last_hidden_state
            targets = ids[:, 1:length + 1]
            mask = torch.ones_like(targets, dtype=torch.bool)
            _, dh = chunked_ce_grad(hidden.detach(), targets, mask, self.head, self.s.logits_chunk)
            (g,) = torch.autograd.grad(hidden, [cap.v_out[0]], grad_outputs=dh.to(hidden.dtype))
        u = cap.u_in[0]
        # The prefix's own loss terms are the same for every sample; a response-only loss has none there.
        const = self.t.scaling * torch.einsum("bto,btr->or", g.float(), u.float()) if self.s.loss == "prompt" else None
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        return (kv, u[0].float(), length), const, length

    def _batch_cache(self, kv, b: int):
        from transformers import DynamicCache

        cache = DynamicCache()
        leaf = None
        for i, (k, v) in enumerate(kv):
            k = k.expand(b, -1, -1, -1)
            v = v.expand(b, -1, -1, -1)
            if i == self.t.layer_index:
                leaf = v.clone().requires_grad_(True)
                v = leaf
            cache.update(k, v, i)
        return cache, leaf

    # -- batches --------------------------------------------------------------------------------
    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(lengths, kind="stable")
        batches, cur, cur_max = [], [], 0
        for i in order:
            new_max = max(cur_max, int(lengths[i]))
            if cur and (new_max * (len(cur) + 1) > self.s.max_batch_tokens or len(cur) >= self.s.max_batch_size):
                batches.append(np.array(cur))
                cur, new_max = [], int(lengths[i])
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(np.array(cur))
        return batches

    def score(self, samples: Sequence[TokenizedSample], progress: ProgressFn | None = None,
              cancel: CancelFn | None = None,
              sink: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
        """Effort score of each sample, in the order given. `sink(indices, scores)` receives each
        batch's scores as soon as they exist (the per-sample store keeps them, so an interrupted
        run loses one batch). Progress counts tokens, not samples: long prompts take longer."""
        started = time.perf_counter()
        prefix, const, plen = self._prefix(samples)
        lengths = np.array([len(x.ids) - plen for x in samples])
        out = np.zeros(len(samples), dtype=np.float64)
        batches = self._batches(lengths)
        total_tokens = max(1, int(sum(len(x.ids) for x in samples)))
        done = done_tokens = 0
        for idx in batches:
            if cancel is not None and cancel():
                raise EffortCancelled()
            norms = self._score_batch([samples[i] for i in idx], prefix, const, plen)
            out[idx] = norms
            if sink is not None:
                sink(idx, norms)
            done += len(idx)
            done_tokens += int(sum(len(samples[i].ids) for i in idx))
            if progress is not None:
                progress(done_tokens / total_tokens, f"effort {done}/{len(samples)}")
        log.info("effort: %d samples in %d batches, prefix %d tokens, %.3f s/sample", len(samples),
                 len(batches), plen, (time.perf_counter() - started) / max(len(samples), 1))
        return out

    def _loss_terms(self, x: TokenizedSample) -> int:
        return len(x.ids) - x.response_from if self.s.loss == "response" else len(x.ids) - 1

    def _score_batch(self, batch: Sequence[TokenizedSample], prefix, const, plen: int) -> np.ndarray:
        b = len(batch)
        lens = [len(x.ids) - plen for x in batch]
        width = max(lens)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, plen + width), dtype=torch.long)
        attn[:, :plen] = 1
        for r, x in enumerate(batch):
            ids[r, :lens[r]] = torch.tensor(x.ids[plen:])
            attn[r, plen:plen + lens[r]] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        # Position t predicts token t+1 of the sample's own part; the last real token has no target.
        targets = torch.roll(ids, -1, dims=1)
        pos = torch.arange(width, device=self.device).unsqueeze(0)
        mask = pos < (torch.tensor(lens, device=self.device).unsqueeze(1) - 1)
        if self.s.loss == "response":
            # Column c predicts token plen + c + 1 of the sample: keep the response's targets only.
            first = torch.tensor([x.response_from - plen - 1 for x in batch], device=self.device).unsqueeze(1)
            mask &= pos >= first

        kwargs = {}
        leaf = None
        if prefix is not None:
            kv, u_prefix, _ = prefix
            cache, leaf = self._batch_cache(kv, b)
            kwargs[_CACHE_KW] = cache
        with _Capture(self.t) as cap, torch.enable_grad():
            hidden = self.t.decoder(input_ids=ids, attention_mask=attn, use_cache=prefix is not None,
                                    **kwargs).last_hidden_state
            _, dh = chunked_ce_grad(hidden.detach(), targets, mask, self.head, self.s.logits_chunk)
            wrt = [cap.v_out[0]] + ([leaf] if leaf is not None else [])
            grads = torch.autograd.grad(hidden, wrt, grad_outputs=dh.to(hidden.dtype))
        u = cap.u_in[0].float()
        gB = torch.einsum("bto,btr->bor", grads[0].float(), u)
        if leaf is not None:
            # Cache layout (b, kv_heads, t, head_dim) -> module output layout (b, t, kv_heads*head_dim).
            g_prefix = grads[1].float().transpose(1, 2).reshape(b, plen, -1)
            gB = gB + torch.einsum("bpo,pr->bor", g_prefix, u_prefix)
        gB = gB * self.t.scaling
        if const is not None:
            gB = gB + const
        n_terms = torch.tensor([self._loss_terms(x) for x in batch], dtype=torch.float32, device=gB.device)
        # The loss is the mean over each sample's own real tokens (padding never counts).
        gB = gB / n_terms.clamp_min(1).view(-1, 1, 1)
        return gB.flatten(1).norm(dim=1).cpu().numpy().astype(np.float64)


def effort_reference(peft_model, target: EffortTarget, sample: TokenizedSample, device: torch.device,
                     loss: str = "prompt") -> float:
    """The reference procedure, for tests and the benchmark baseline: batch size 1, fp32, every
    LoRA weight requiring grad and a full backward pass, then read lora_B's .grad. `loss="response"`
    masks the labels before the sample's `response_from` (the causal-LM loss of the response alone)."""
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
        p.grad = None
    try:
        ids = torch.tensor([sample.ids], device=device)
        labels = ids.clone()
        if loss == "response":
            labels[:, :sample.response_from] = -100
        with torch.enable_grad():
            peft_model(input_ids=ids, labels=labels).loss.backward()
        return float(target.lora_B.weight.grad.norm())
    finally:
        for p in lora_params:
            p.requires_grad_(False)
            p.grad = None
