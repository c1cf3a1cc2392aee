"""LLM-level quality as BIGRec measures it: generate a title for each test user, ground it to real
items by embedding distance, and compute Recall@K / NDCG@K over the full item catalogue.

Follows the DEALRec reference's `inference_ddp.py` and `data/evaluate.py`:
- the test prompt's history is the user's training line plus validation items, the targets are the
  test items; users without a test item are skipped;
- beam search (4 beams, 128 new tokens, one returned sequence), the generated text taken after the
  prompt with surrounding double quotes stripped;
- the generated text and every item title are embedded by the *base* LLM (no adapter) as the final
  (normed) last-layer hidden state of the last token, and items are ranked by L2 distance, seen
  items not excluded (both configurable: `embed_with`, `exclude_seen`).
Where ours differs: a long test prompt loses its oldest history items (the reference cut the prompt
with the target title in it, then cut again from the right at 512 tokens, which can drop
"### Response:"); texts are right-padded and read at their real last token, so batching does not
change an embedding; distance ties go to the lower item index; item titles are whitespace-cleaned
as in the training records, so a generated text equal to an item's title is at distance 0.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import LLMEvalConfig
from core.data.dataset import RecDataset
from core.effort.prompts import (
    PromptTemplate,
    TokenizedSample,
    clean_title,
    format_prompt,
    make_record,
    tokenize_samples,
)
from core.evaluate.generate import generate_batched, mean_nll
from core.evaluate.journal import GenerationJournal, fingerprint, weights_fingerprint
from core.progress import uninterruptible
from core.surrogate.metrics import recall_ndcg_at_k
from core.surrogate.train import Cancelled

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float, str], None]  # (stage, fraction of that stage, message)
CancelFn = Callable[[], bool]
STAGES = ("load", "items", "generate", "ground")


class EvaluationCancelled(Cancelled):
    """Raised when `cancel()` returns True."""


def _check(cancel: CancelFn | None) -> None:
    if cancel is not None and cancel():
        raise EvaluationCancelled("evaluation cancelled")


def _report(progress: ProgressFn | None, stage: str, frac: float, msg: str = "") -> None:
    if progress is not None:
        progress(stage, frac, msg)


# ----------------------------------------------------------------------------------------------
# Pure pieces


def select_test_users(ds: RecDataset, n: int | None = None, seed: int = 0) -> list[int]:
    """Users with at least one test item and a history (train + valid) before it, in index order (a
    user without a training sample counts when he has validation items); with `n`, a seeded random
    subset of n of them (the same n and seed always give the same users)."""
    users = [u for u in range(ds.n_users) if ds.test[u] and (ds.train[u] or ds.valid[u])]
    if n is not None and n < len(users):
        rng = np.random.default_rng(seed)
        users = sorted(int(users[i]) for i in rng.choice(len(users), size=n, replace=False))
    return users


def _distances(queries: torch.Tensor, items: torch.Tensor, exclude: Sequence[Sequence[int]] | None,
               chunk: int):
    """(start, L2 distances of queries[start:start + chunk] to every item row), the rows excluded for a
    query at +inf. Both rankings below read them from here, so they order the items identically."""
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and items {tuple(items.shape)} must be 2-d with one width")
    items = items.float()
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start:start + chunk].float(), items, p=2)
        if exclude is not None:
            for r, ex in enumerate(exclude[start:start + chunk]):
                if len(ex):
                    d[r, torch.as_tensor(list(ex), dtype=torch.long)] = float("inf")
        yield start, d


def rank_by_distance(queries: torch.Tensor, items: torch.Tensor, k: int,
                     exclude: Sequence[Sequence[int]] | None = None, chunk: int = 256) -> np.ndarray:
    """(n_queries, k) row indices of `items`, nearest first by L2 distance; ties go to the lower
    index. `exclude[q]` lists item rows never ranked for query q (their slots, if fewer than k rows
    remain, are -1)."""
    n_cols = min(k, items.shape[0])
    out = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for start, d in _distances(queries, items, exclude, chunk):
        order = torch.sort(d, dim=1, stable=True)
        idx = order.indices[:, :n_cols].masked_fill(torch.isinf(order.values[:, :n_cols]), -1)
        out[start:start + d.shape[0], :n_cols] = idx.cpu().numpy()
    return out


def full_ranks(queries: torch.Tensor, items: torch.Tensor, targets: Sequence[Sequence[int]],
               exclude: Sequence[Sequence[int]] | None = None,
               chunk: int = 256) -> list[tuple[int, int] | None]:
    """For each query, (0-based rank of its best-placed target row in the whole ranking that
    `rank_by_distance` starts, number of rows ranked): the rows nearer than the target plus the
    equally near ones of lower index, excluded rows left out. None where no target is ranked. A dense
    signal beside Recall/NDCG@K, which see only the first K places."""
    out: list[tuple[int, int] | None] = []
    for start, d in _distances(queries, items, exclude, chunk):
        index = torch.arange(d.shape[1], device=d.device)
        for r in range(d.shape[0]):
            row, ranked = d[r], int(torch.isfinite(d[r]).sum())
            best = None
            for t in targets[start + r]:
                if not torch.isfinite(row[t]):
                    continue
                rank = int((row < row[t]).sum() + ((row == row[t]) & (index < t)).sum())
                best = rank if best is None else min(best, rank)
            out.append(None if best is None else (best, ranked))
    return out


def _decoder(model):
    """The transformer body (no LM head) of a causal LM or a peft model around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix, None)
    return body if body is not None else base.get_decoder()


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                device: torch.device | str = "cpu", progress: Callable[[float, str], None] | None = None,
                cancel: CancelFn | None = None) -> torch.Tensor:
    """(len(texts), hidden) fp32: the final last-layer hidden state (after the last norm, i.e. the
    reference's `hidden_states[-1]`) at each text's last token, the text tokenised with the
    tokenizer's own special tokens. Texts are grouped by length and right-padded, and each row is read
    at its real last token: an embedding does not depend on the batch. An empty text is embedded as
    the EOS token alone (it has no token of its own)."""
    body = _decoder(model)
    filler = tokenizer.eos_token_id
    encoded = [list(ids) or [filler] for ids in tokenizer(list(texts))["input_ids"]] if texts else []
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    hidden = None
    for _done, start in enumerate(range(0, len(order), batch_size)):
        _check(cancel)
        part = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in part)
        ids = torch.full((len(part), width), filler, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, i in enumerate(part):
            ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, :len(encoded[i])] = 1
        states = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        last = torch.tensor([len(encoded[i]) - 1 for i in part], device=states.device)
        rows = states[torch.arange(len(part), device=states.device), last].float().cpu()
        if hidden is None:
            hidden = torch.empty((len(encoded), rows.shape[1]), dtype=torch.float32)
        hidden[torch.tensor(part)] = rows
        if progress is not None:
            progress(min(1.0, (start + len(part)) / len(order)), f"{start + len(part)}/{len(order)} texts")
    if hidden is None:
        return torch.zeros((0, model.config.hidden_size), dtype=torch.float32)
    return hidden


# ----------------------------------------------------------------------------------------------
# The evaluation


def _autocast(precision: str, dev: torch.device) -> Callable:
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        return lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return nullcontext


def _base_only(model, enabled: bool):
    """Context in which a peft model runs without its adapter (the reference embeds with the base)."""
    if enabled and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return nullcontext()


def answer_tokens(ds: RecDataset, samples: Sequence[TokenizedSample], tokenizer,
                  template: PromptTemplate | None = None) -> list[tuple[int, ...]]:
    """Per test sample, the tokens a fine-tuned model should write after the prompt: the first test
    item's (cleaned) title and EOS, tokenised together with the prompt as the training records are
    (so a merge across the boundary is what training saw); a tokenizer that merges across the
    boundary differently falls back to the title tokenised alone."""
    template = template or PromptTemplate()
    eos = tokenizer.eos_token_id
    out = []
    for s in samples:
        rec = make_record(ds, s.user, template, s.kept, split="test")
        title = clean_title(ds.item_titles[ds.test[s.user][0] - 1])
        full = list(tokenizer(format_prompt(rec.instruction, rec.input, title))["input_ids"])
        if full[:len(s.ids)] == list(s.ids) and len(full) > len(s.ids):
            answer = full[len(s.ids):]
        else:
            answer = list(tokenizer(title, add_special_tokens=False)["input_ids"])
        out.append(tuple(answer + [eos]))
    return out


def item_embeddings(model, tokenizer, ds: RecDataset, cfg: LLMEvalConfig, *, device: torch.device | str = "cpu",
                    progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> torch.Tensor:
    """(n_items, hidden): row i - 1 embeds item i's (cleaned) title with the model `cfg.embed_with` names."""
    titles = [clean_title(t) for t in ds.item_titles]
    with _base_only(model, cfg.embed_with == "base"):
        return embed_texts(model, tokenizer, titles, batch_size=cfg.embed_batch_size, device=device,
                           progress=lambda f, m: _report(progress, "items", f, m), cancel=cancel)


def evaluate_llm(model, tokenizer, ds: RecDataset, cfg: LLMEvalConfig, *, template: PromptTemplate | None = None,
                 device: torch.device | str = "cpu", items: torch.Tensor | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 journal: Path | None = None, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """BIGRec evaluation of `model` (a causal LM, or a peft model with its adapter) on the test users of
    `ds` (`cfg.test_users` of them, seeded, or all with a test item).

    `items`: precomputed `item_embeddings` (else computed here). Returns {"metrics": {"recall@K",
    "ndcg@K", ..., "rank_pct", "users", "nll"}, "predictions": [{"user", "user_id", "generated", "targets",
    "target_rank", "target_full_rank", "rank_pct", "top10", "metrics", "nll", "answer_tokens"}],
    "seconds": {...}, "generation": {...}}; item ids are 1-based, `target_rank` is the 0-based rank of
    the best-placed test item among the first max(ks) (None beyond), `target_full_rank` its rank among
    all items ranked and `rank_pct` that rank in % of them (`metrics["rank_pct"]`: the mean over the
    users with a test item ranked, None without any; lower is better), "metrics" the user's own;
    "nll" (with `cfg.nll`) the mean negative log-likelihood per token of the true test title and EOS
    after the prompt, teacher forced.

    `journal`: a file in which each finished generation batch is recorded, so that a rerun after an
    interruption resumes there (core.evaluate.journal; the caller removes it once the result is kept).
    It is valid for these prompts, answers, settings, dataset and weights (sampled), and for `identity`
    (what the caller adds, e.g. the adapter file's digest)."""
    template = template or PromptTemplate()
    dev = torch.device(device)
    times: dict[str, float] = {}
    users = select_test_users(ds, cfg.test_users, cfg.seed)
    if items is None and cfg.generate:  # without generation nothing is grounded
        t = time.perf_counter()
        items = item_embeddings(model, tokenizer, ds, cfg, device=dev, progress=progress, cancel=cancel)
        times["items"] = time.perf_counter() - t
    if items is not None and items.shape[0] != ds.n_items:
        raise ValueError(f"item embeddings have {items.shape[0]} rows for {ds.n_items} items")

    t = time.perf_counter()
    samples = tokenize_samples(ds, users, tokenizer, cfg.cutoff_len, template, split="test")
    prompts = [s.ids for s in samples]
    answers = answer_tokens(ds, samples, tokenizer, template) if cfg.nll else None
    _report(progress, "generate", 0.0, f"{len(users)} users")
    record = None
    if journal is not None:
        # Content, never paths: the LLM and adapter by their weights, the settings without where they lie.
        settings = cfg.model_dump(mode="json", exclude={"llm", "gguf_file", "adapter", "device"})
        record = GenerationJournal(journal, fingerprint(
            settings, str(dev), ds.fingerprint, identity or {}, weights_fingerprint(model),
            [list(p) for p in prompts], [list(a) for a in answers] if answers is not None else None))
    gen = generate_batched(model, tokenizer, prompts, answers, num_beams=cfg.num_beams,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=dev,
                           autocast=_autocast(cfg.precision, dev), share_prefix=cfg.share_prefix,
                           generate=cfg.generate, progress=lambda f, m: _report(progress, "generate", f, m),
                           cancel=lambda: _check(cancel) or False, journal=record)
    generated = gen.texts
    times["generate"] = time.perf_counter() - t + (record.seconds if record is not None else 0.0)
    if not cfg.generate:
        _report(progress, "ground", 1.0, "no generation")
        return {"metrics": {"users": len(users), "nll": mean_nll(gen.nll)},
                "predictions": [{"user": u, "user_id": ds.user_ids[u], "targets": list(ds.test[u]),
                                 "nll": gen.nll[r], "answer_tokens": gen.answer_tokens[r]}
                                for r, u in enumerate(users)],
                "seconds": times, "generation": {"new_tokens": 0, "seconds": gen.seconds, "tokens_per_second": 0.0}}

    t = time.perf_counter()
    with _base_only(model, cfg.embed_with == "base"):
        queries = embed_texts(model, tokenizer, generated, batch_size=cfg.embed_batch_size, device=dev,
                              progress=lambda f, m: _report(progress, "ground", f, m), cancel=cancel)
    max_k = max(cfg.ks)
    exclude = None
    if cfg.exclude_seen:
        exclude = [[i - 1 for i in ds.train[u] + ds.valid[u]] for u in users]
    ranked = rank_by_distance(queries, items, max_k, exclude)
    ranked = np.where(ranked >= 0, ranked + 1, -1)  # rows -> 1-based item ids
    truths = [ds.test[u] for u in users]
    metrics: dict[str, Any] = recall_ndcg_at_k(ranked, truths, cfg.ks) if users else \
        {f"{m}@{k}": 0.0 for k in cfg.ks for m in ("recall", "ndcg")}
    metrics = {key: metrics[key] for k in sorted(cfg.ks) for key in (f"recall@{k}", f"ndcg@{k}")}
    metrics["users"] = len(users)
    # Where the true item lands in the whole ranking, as a percentage of the items ranked (lower is
    # better): every user contributes, not only the few with a hit in the first K.
    dense = full_ranks(queries, items, [[i - 1 for i in ds.test[u]] for u in users], exclude)
    rank_pct = [None if x is None else 100.0 * x[0] / x[1] for x in dense]
    # Over the users with a test item left to rank (all of them unless seen items are excluded);
    # None, not NaN, when there is none: metrics.json stays strict JSON.
    ranked_users = [v for v in rank_pct if v is not None]
    metrics["rank_pct"] = float(np.mean(ranked_users)) if ranked_users else None
    if cfg.nll:
        # Mean over users of each user's mean NLL per answer token (title + EOS), teacher forced.
        metrics["nll"] = mean_nll(gen.nll)
    times["ground"] = time.perf_counter() - t

    predictions = []
    for r, u in enumerate(users):
        hits = [j for j in range(max_k) if ranked[r, j] in set(ds.test[u])]
        # The user's own metrics (their mean over users is `metrics`): paired comparisons of two
        # adapters on the same users need them.
        own = recall_ndcg_at_k(ranked[r:r + 1], [ds.test[u]], cfg.ks)
        predictions.append({"user": u, "user_id": ds.user_ids[u], "generated": generated[r],
                            "targets": list(ds.test[u]), "target_rank": hits[0] if hits else None,
                            "target_full_rank": None if dense[r] is None else dense[r][0], "rank_pct": rank_pct[r],
                            "top10": [int(i) for i in ranked[r, :10]],
                            "metrics": {key: own[key] for k in sorted(cfg.ks) for key in (f"recall@{k}", f"ndcg@{k}")},
                            **({"nll": gen.nll[r], "answer_tokens": gen.answer_tokens[r]} if cfg.nll else {})})
    _report(progress, "ground", 1.0, "done")
    return {"metrics": metrics, "predictions": predictions, "seconds": times,
            "generation": {"new_tokens": gen.new_tokens, "seconds": gen.seconds,
                           "tokens_per_second": gen.new_tokens / gen.seconds if gen.seconds else 0.0}}


def titles_digest(ds: RecDataset) -> str:
    h = hashlib.sha256()
    for t in ds.item_titles:
        h.update(clean_title(t).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def run_evaluate(ds: RecDataset, cfg: LLMEvalConfig, *, cache_dir: Path | None = None, use_cache: bool = True,
                 template: PromptTemplate | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, journal: Path | None = None) -> dict[str, Any]:
    """Load the configured LLM (and adapter), then `evaluate_llm` (with its resumable `journal` when
    given). The base model's item embeddings
    are cached under `cache_dir` (they depend only on the LLM and the titles, not on the adapter).
    Returns `evaluate_llm`'s result plus "params" (the resolved config, LLM identity, device)."""
    from core.cache import cache_key, load_arrays, save_arrays
    from core.device import resolve_device
    from core.effort.llm import LLMError, load_base_model, resolve_llm

    t0 = time.perf_counter()
    source = resolve_llm(cfg.llm, cfg.gguf_file)
    if cfg.adapter and not Path(cfg.adapter, "adapter_config.json").is_file():
        raise LLMError(f"adapter folder '{cfg.adapter}' has no adapter_config.json")
    dev = resolve_device(cfg.device)
    _report(progress, "load", 0.0, "loading the LLM")
    with uninterruptible(cancel, EvaluationCancelled, "loading the LLM"):
        model, tokenizer = load_base_model(source, cache_dir)
        if cfg.adapter:
            import warnings

            from peft import PeftModel

            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=False)
        model = model.to(dev).eval()
    _report(progress, "load", 1.0, "")
    load_seconds = time.perf_counter() - t0

    items = None
    path = None
    if cache_dir is not None and use_cache and cfg.generate and (cfg.embed_with == "base" or not cfg.adapter):
        path = Path(cache_dir) / cache_key("items-bigrec", llm=source.key(), titles=titles_digest(ds)) / "items.npz"
        got = load_arrays(path)
        if got is not None and got["emb"].shape[0] == ds.n_items:
            items = torch.from_numpy(got["emb"])
            _report(progress, "items", 1.0, "from cache")
    if items is None and cfg.generate:
        t = time.perf_counter()
        items = item_embeddings(model, tokenizer, ds, cfg, device=dev, progress=progress, cancel=cancel)
        item_seconds = time.perf_counter() - t
        if path is not None:
            save_arrays(path, emb=items.numpy())
    else:
        item_seconds = 0.0
    # The adapter folder's whole content (as the effort store names it), beside the sampled weights
    # evaluate_llm digests.
    from core.effort.store import file_digest

    identity = {"adapter": file_digest(cfg.adapter)}
    result = evaluate_llm(model, tokenizer, ds, cfg, device=dev, items=items, template=template,
                          progress=progress, cancel=cancel, journal=journal, identity=identity)
    result["seconds"] = {"load": load_seconds, "items": item_seconds, **result["seconds"],
                         "total": time.perf_counter() - t0}
    result["params"] = {**cfg.model_dump(mode="json"),
                        "llm_source": {"path": str(source.folder.resolve()), "gguf_file": source.gguf_file,
                                       "key": source.key()},
                        "device": str(dev), "dataset_fingerprint": ds.fingerprint}
    return result
