"""Batched generation and teacher-forced answer likelihood for the BIGRec evaluation, at the cost of
one prompt pass per user.

What `model.generate(num_beams=k)` alone would spend, and how this avoids it:
- beam search copies every prompt k times *before* the prompt's forward pass, so the prompt (about
  200 tokens of a Games test prompt, against at most 32 generated ones) is run k times. Here each
  prompt runs once; its key/value cache is then repeated for the beams and handed to `generate`,
  which continues from it (only the prompt's last token goes through `generate`'s own first pass);
- every test prompt starts with the same Alpaca header and instruction (about 40% of its tokens).
  That shared prefix runs once for all users; each batch attends to its cached keys/values, and the
  users' own tokens follow it, left-padded within the batch (padding in the middle of the sequence is
  masked, and positions come from the mask, so every real token keeps its unpadded position);
- the same prompt pass also yields each user's negative log-likelihood of the true answer (the
  target title and EOS, teacher forced): the answer tokens ride along after the prompt, and the
  cache is cut back to the prompt before generation.

Results are those of one-by-one generation without any of this (up to float rounding of padded
matrix shapes): tested in tests/test_generate.py on a tiny model.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from core.evaluate.journal import GenerationJournal, JournalRow

log = logging.getLogger(__name__)

CancelFn = Callable[[], bool]


def _cache_kw(body) -> str:
    """transformers 5 names the forward's cache argument `cache`; older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix common to all prompts, less one so that every prompt keeps
    at least one token of its own (generation continues from a prompt's last token). 0 for fewer
    than two prompts' worth of sharing."""
    if not prompts:
        return 0
    first = prompts[0]
    common = min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < common and p[k] == first[k]:
            k += 1
        common = k
    return max(0, min(common, min(len(p) for p in prompts) - 1))


def clean_generated(text: str) -> str:
    """The generated title as the reference grounds it: surrounding double quotes stripped."""
    return text.strip('"')


@dataclass(frozen=True)
class GenerationResult:
    texts: list[str]  # per prompt, in the order given
    nll: list[float | None]  # mean NLL per answer token (None without an answer)
    answer_tokens: list[int]  # answer tokens scored per prompt
    new_tokens: int  # tokens generated, all prompts (EOS included, padding after it excluded)
    seconds: float


class _Prefix:
    """The shared prompt prefix, run once: its ids and its per-layer keys/values (batch 1)."""

    def __init__(self, body, ids: Sequence[int], device, autocast: Callable) -> None:
        from transformers import DynamicCache

        self.ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not len(ids):
            return
        cache = DynamicCache()
        with autocast():
            body(input_ids=self.ids, use_cache=True, **{_cache_kw(body): cache})
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def __len__(self) -> int:
        return self.ids.shape[1]

    def cache_for(self, batch: int):
        """A fresh cache holding the prefix for `batch` rows (views: nothing is copied until the
        first append)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache


def _head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def _body(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix, None)
    return body if body is not None else base.get_decoder()


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: Sequence[Sequence[int]],
                     answers: Sequence[Sequence[int] | None] | None = None, *, num_beams: int = 4,
                     max_new_tokens: int = 128, batch_size: int = 16, device: torch.device | str = "cpu",
                     autocast: Callable = nullcontext, share_prefix: bool = True, generate: bool = True,
                     progress: Callable[[float, str], None] | None = None,
                     cancel: CancelFn | None = None, journal: GenerationJournal | None = None) -> GenerationResult:
    """Beam-search continuation of each tokenised prompt (decoded without special tokens, surrounding
    double quotes stripped) and, where `answers[i]` is given, the mean negative log-likelihood of
    those tokens after prompt i (teacher forced, in eval mode).

    Prompts are processed in batches of `batch_size` of similar length. `share_prefix` runs the
    prefix common to all prompts once; `generate=False` computes only the likelihoods. With a
    `journal`, batches it holds are taken from it and each new one is recorded there (the batches
    are the same on every run, so a resumed pass gives the results of an uninterrupted one)."""
    from transformers import GenerationConfig

    from core.surrogate.train import Cancelled

    started = time.perf_counter()
    dev = torch.device(device)
    n = len(prompts)
    answers = list(answers) if answers is not None else [None] * n
    if len(answers) != n:
        raise ValueError(f"{len(answers)} answers for {n} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(num_beams=num_beams, num_return_sequences=1, max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    body, head = _body(model), _head(model)
    cache_kw = _cache_kw(body)
    prefix = _Prefix(body, prompts[0][:shared_prefix_length(prompts)] if share_prefix else [], dev, autocast)
    plen = len(prefix)

    texts: list[str] = [""] * n
    nll: list[float | None] = [None] * n
    scored = [0] * n
    new_tokens = 0
    earlier = journal.seconds if journal is not None else 0.0
    order = sorted(range(n), key=lambda i: (len(prompts[i]), i))
    for start in range(0, n, batch_size):
        if cancel is not None and cancel():
            raise Cancelled("generation cancelled")
        part = order[start:start + batch_size]
        b = len(part)
        if journal is not None and all(i in journal.rows for i in part):
            for i in part:
                row = journal.rows[i]
                texts[i], nll[i], scored[i] = row.text, row.nll, row.answer_tokens
                new_tokens += row.new_tokens
            continue
        batch_started, batch_new = time.perf_counter(), [0] * b
        own = [list(prompts[i][plen:]) for i in part]
        ans = [list(answers[i] or []) for i in part]
        width, a_width = max(len(x) for x in own), max(len(a) for a in ans)
        # Columns: [shared prefix (cached)] [left padding, the user's own prompt tokens] [answer, right padding]
        ids = torch.full((b, width + a_width), pad, dtype=torch.long)
        mask = torch.zeros((b, plen + width + a_width), dtype=torch.long)
        mask[:, :plen] = 1
        for r, (x, a) in enumerate(zip(own, ans)):
            ids[r, width - len(x):width] = torch.tensor(x)
            mask[r, plen + width - len(x):plen + width] = 1
            if a:
                ids[r, width:width + len(a)] = torch.tensor(a)
                mask[r, plen + width:plen + width + len(a)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, plen:]
        # Generation continues from the prompt's last token, so that token is left out of the cache
        # when there is nothing to score (with answers it is needed: it predicts the first one).
        run_cols = width + a_width if a_width else width - 1
        cache = prefix.cache_for(b)
        if run_cols:
            with autocast():
                hidden = body(input_ids=ids[:, :run_cols], attention_mask=mask[:, :plen + run_cols],
                              position_ids=positions[:, :run_cols], use_cache=True,
                              **{cache_kw: cache}).last_hidden_state
            for r, (i, a) in enumerate(zip(part, ans)):
                if a:
                    # Column width - 1 (the prompt's last token) predicts a[0], and so on.
                    h = hidden[r, width - 1:width - 1 + len(a)].float()
                    logits = h @ head.weight.float().T
                    if head.bias is not None:
                        logits = logits + head.bias.float()
                    target = torch.tensor(a, device=logits.device)
                    nll[i] = float(torch.nn.functional.cross_entropy(logits, target, reduction="mean"))
                    scored[i] = len(a)
            if a_width:
                cache.crop(-(a_width + 1))
        if generate:
            if num_beams > 1:
                cache.batch_repeat_interleave(num_beams)
            full_ids = torch.cat([prefix.ids.expand(b, -1), ids[:, :width]], dim=1)
            with autocast():
                seqs = model.generate(input_ids=full_ids, attention_mask=mask[:, :plen + width],
                                      generation_config=gen, **{cache_kw: cache})
            out = seqs[:, plen + width:]
            for r, i in enumerate(part):
                row = out[r].tolist()
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id) + 1]
                batch_new[r] = len(row)
                new_tokens += len(row)
                texts[i] = clean_generated(tokenizer.decode(row, skip_special_tokens=True))
        if journal is not None:
            journal.record({i: JournalRow(texts[i], nll[i], scored[i], batch_new[r]) for r, i in enumerate(part)},
                           time.perf_counter() - batch_started)
        if progress is not None:
            done = start + b
            progress(done / n, f"{done}/{n} users, {(time.perf_counter() - started + earlier) / done:.2f} s/user")
    seconds = time.perf_counter() - started + earlier
    log.info("generation: %d prompts (shared prefix %d tokens) in %.1f s, %d new tokens", n, plen, seconds, new_tokens)
    return GenerationResult(texts, nll, scored, new_tokens, seconds)


@torch.no_grad()
def generate_plain(model, tokenizer, prompts: Sequence[Sequence[int]], *, num_beams: int = 4,
                   max_new_tokens: int = 128, batch_size: int = 4, device: torch.device | str = "cpu",
                   autocast: Callable = nullcontext, progress: Callable[[float, str], None] | None = None,
                   cancel: CancelFn | None = None) -> list[str]:
    """`model.generate` on left-padded batches of similar length, each prompt run in full for every
    beam: the reference's procedure, kept as the baseline `generate_batched` is measured and tested
    against (bench/generation.py)."""
    from transformers import GenerationConfig

    from core.surrogate.train import Cancelled

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(num_beams=num_beams, num_return_sequences=1, max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[str] = [""] * len(prompts)
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        if cancel is not None and cancel():
            raise Cancelled("generation cancelled")
        part = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, i in enumerate(part):
            n = len(prompts[i])
            ids[r, width - n:] = torch.tensor(list(prompts[i]))
            mask[r, width - n:] = 1
        with autocast():
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        texts = tokenizer.batch_decode(seqs[:, width:], skip_special_tokens=True)
        for i, text in zip(part, texts):
            out[i] = clean_generated(text)
        if progress is not None:
            done = start + len(part)
            progress(done / len(order), f"{done}/{len(order)} users, {(time.perf_counter() - t0) / done:.1f} s/user")
    return out


def mean_nll(values: Sequence[float | None]) -> float:
    """Mean over the users that have a score (NaN when none has)."""
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else float("nan")
