"""LoRA fine-tuning of the LLM recommender on a selection's BIGRec records.

The recipe is the DEALRec reference's few-shot run (see `FinetuneConfig`): Alpaca/BIGRec prompts with
the whole prompt in the loss, LoRA on q_proj and v_proj, AdamW at 1e-4 with 20 warmup steps and a
linear decay, effective batch 128 by gradient accumulation, up to 50 epochs with early stopping on
the selected users' validation samples and the best adapter kept. Our own loop instead of the
transformers Trainer, so that progress, cancel and determinism are ours. Where it differs:

- the loss of an optimizer step is the token mean over the whole effective batch (the Trainer of the
  reference's era averaged per micro-batch means), so the micro-batch size changes speed, not the
  result, and each effective batch can be cut into length-sorted micro-batches with little padding;
- the schedule is the Trainer's linear warmup/decay read one step later: its first update has
  learning rate 0 (a wasted step, and at a 16-sample budget a whole epoch), ours lr / warmup;
- validation runs every `eval_every` epochs (the reference: every 100 optimizer steps, which at a
  1,024 budget and batch 128 is every 12.5 epochs, so its patience of 5 never ends a 50-epoch run);
- prompts are cut by dropping the oldest history items (as `bigrec_train.jsonl`), never mid-prompt;
- seeded: LoRA initialisation, shuffling and dropout, so a run is reproducible on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import FinetuneConfig
from core.data.dataset import RecDataset
from core.effort.prompts import PromptTemplate, Split, format_prompt, make_record, tokenize_samples
from core.finetune_checkpoint import (
    DEFAULT_EVERY_S,
    LoopState,
    base_fingerprint,
    load_checkpoint,
    save_checkpoint,
    training_fingerprint,
)
from core.progress import uninterruptible
from core.surrogate.train import Cancelled

log = logging.getLogger(__name__)

FORMAT = "dealrec-finetune-v1"
META_FILE = "finetune.json"

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


class FinetuneCancelled(Cancelled):
    """Raised by `train_lora` / `run_finetune` when `cancel()` returns True (a `Cancelled`, so code
    that already handles the surrogate's cancellation handles this one too)."""


class FinetuneError(ValueError):
    """Bad input for fine-tuning: no samples, an output folder that is not ours to replace, ..."""


# ----------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class EncodedSample:
    """One tokenised training or validation sample: `ids` (prompt, response, EOS; at most cutoff_len)
    and the first position whose token counts in the loss (0 = the whole prompt, the reference)."""

    ids: tuple[int, ...]
    loss_from: int = 0

    def n_loss_tokens(self) -> int:
        # Position 0 is never predicted (nothing precedes it).
        return max(0, len(self.ids) - max(self.loss_from, 1))


def encode_users(ds: RecDataset, users: Sequence[int], tokenizer, cutoff_len: int, *,
                 template: PromptTemplate | None = None, split: Split = "train",
                 train_on_inputs: bool = True) -> list[EncodedSample]:
    """The users' BIGRec samples for `split` ("train": history -> last training item, exactly the
    records of `bigrec_train.jsonl`; "valid": whole training line -> validation item, users without
    one skipped), cut to `cutoff_len` tokens by dropping the oldest history items."""
    template = template or PromptTemplate()
    if split == "valid":
        users = [u for u in users if ds.valid[u]]
    cut = tokenize_samples(ds, list(users), tokenizer, cutoff_len, template, split=split)
    out = []
    for s in cut:
        start = 0
        if not train_on_inputs:
            rec = make_record(ds, s.user, template, s.kept, split)
            start = min(len(tokenizer(format_prompt(rec.instruction, rec.input, ""))["input_ids"]), len(s.ids))
        out.append(EncodedSample(s.ids, start))
    return out


def encode_records(records: Iterable[dict], tokenizer, cutoff_len: int, *,
                   train_on_inputs: bool = True) -> list[EncodedSample]:
    """Samples from `{"instruction", "input", "output"}` records (a `bigrec_train.jsonl` file) as the
    reference tokenises them: the tokenizer's special tokens, EOS appended when missing, then a hard
    cut at `cutoff_len` (records written by `dealrec prune` already fit the LLM they were cut for)."""
    eos = tokenizer.eos_token_id
    out = []
    for i, rec in enumerate(records):
        try:
            instruction, input_text, output = rec["instruction"], rec["input"], rec["output"]
        except (KeyError, TypeError):
            raise FinetuneError(f"record {i + 1} lacks one of 'instruction', 'input', 'output'") from None
        ids = list(tokenizer(format_prompt(instruction, input_text, output))["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
        ids = ids[:cutoff_len]
        start = 0
        if not train_on_inputs:
            start = min(len(tokenizer(format_prompt(instruction, input_text, ""))["input_ids"]), len(ids))
        out.append(EncodedSample(tuple(ids), start))
    return out


def selection_fingerprint(dataset_fingerprint: str, user_ids: Iterable[str]) -> str:
    """Identity of a training set: the dataset's content fingerprint and the selected source user
    ids as a set (order does not matter: training shuffles them anyway)."""
    blob = json.dumps({"dataset": dataset_fingerprint, "users": sorted(str(u) for u in user_ids)})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Schedule and batches


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, scheduler: str = "linear") -> float:
    """Learning-rate factor for optimizer update `step` (1-based) of `total_steps`: linear warmup
    step / warmup for the first `warmup_steps` updates, then (linear) a decay that reaches
    1 / (total - warmup) at the last update, or (constant) 1."""
    if step < 1:
        raise ValueError("step is 1-based")
    if warmup_steps and step <= warmup_steps:
        return step / warmup_steps
    if scheduler == "constant":
        return 1.0
    return max(0.0, (total_steps - step + 1) / max(1, total_steps - warmup_steps))


def epoch_batches(lengths: Sequence[int], batch_size: int, micro_batch_size: int,
                  rng: np.random.Generator, micro_batch_tokens: int = 0) -> list[list[list[int]]]:
    """One epoch: a seeded shuffle cut into effective batches of `batch_size` (the last may be
    smaller), each cut into micro-batches after sorting it by length (longest first), so that a
    micro-batch pads little: `micro_batch_size` samples each, or, with `micro_batch_tokens` > 0, as
    many consecutive samples as fit that many padded tokens (at least one). The effective batches, and
    so the loss of every update, are the same either way. Returns [effective batch][micro-batch]
    [sample index]."""
    order = rng.permutation(len(lengths))
    steps = []
    for start in range(0, len(order), batch_size):
        chunk = sorted(order[start:start + batch_size].tolist(), key=lambda i: (-lengths[i], i))
        if micro_batch_tokens > 0:
            steps.append(_token_micro_batches(chunk, lengths, micro_batch_tokens))
        else:
            steps.append([chunk[j:j + micro_batch_size] for j in range(0, len(chunk), micro_batch_size)])
    return steps


def _token_micro_batches(chunk: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive runs of a longest-first list whose padded size (count x first length) stays
    within `budget` tokens."""
    out: list[list[int]] = []
    for i in chunk:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def collate(samples: Sequence[EncodedSample], pad_id: int, device: torch.device | str = "cpu"):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on padding and before each
    sample's `loss_from`. Right padding keeps every real token's positions as in an unpadded pass."""
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s.ids)
        ids[r, :n] = torch.tensor(s.ids, dtype=torch.long)
        mask[r, :n] = 1
        labels[r, s.loss_from:n] = ids[r, s.loss_from:n]
    return ids.to(device), mask.to(device), labels.to(device)


def _summed_loss(model, ids, mask, labels, autocast) -> torch.Tensor:
    """Sum over the batch of the causal-LM token losses (next-token cross-entropy, fp32)."""
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="sum")


@torch.no_grad()
def mean_loss(model, samples: Sequence[EncodedSample], pad_id: int, *, micro_batch_size: int = 4,
              device: torch.device | str = "cpu", autocast: Callable = nullcontext,
              cancel: CancelFn | None = None) -> float:
    """Token-mean causal-LM loss over `samples` in eval mode (no dropout); the batching does not
    change it beyond float rounding. NaN when there are no loss tokens."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].ids))
    try:
        for start in range(0, len(order), micro_batch_size):
            if cancel is not None and cancel():
                raise FinetuneCancelled("fine-tuning cancelled")
            part = [samples[i] for i in order[start:start + micro_batch_size]]
            total += float(_summed_loss(model, *collate(part, pad_id, device), autocast))
            tokens += sum(s.n_loss_tokens() for s in part)
    finally:
        model.train(was_training)
    return total / tokens if tokens else float("nan")


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class FinetuneResult:
    epochs_run: int
    best_epoch: int  # 0 when no validation sample exists (the last state is kept)
    stopped_early: bool
    steps: int
    seconds: float
    train_samples: int
    valid_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: epoch, train_loss, valid_loss, lr

    @property
    def seconds_per_sample(self) -> float:
        """Wall time per training sample seen (validation included in the time)."""
        return self.seconds / max(1, self.train_samples * self.epochs_run)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_lora(model, train: Sequence[EncodedSample], valid: Sequence[EncodedSample], cfg: FinetuneConfig, *,
               pad_id: int, device: torch.device | str = "cpu", autocast: Callable = nullcontext,
               progress: ProgressFn | None = None, cancel: CancelFn | None = None,
               checkpoint: Path | None = None, checkpoint_every_s: float = DEFAULT_EVERY_S) -> FinetuneResult:
    """Train the parameters of `model` that require grad (its LoRA weights) on `train`, and restore
    the state with the lowest validation loss at the end.

    One optimizer update per effective batch of `cfg.batch_size` samples; the loss of an update is the
    token-mean over that batch, accumulated over micro-batches. Validation (token-mean loss over
    `valid`) every `cfg.eval_every` epochs and after the last; stop after `cfg.patience` evaluations
    without a strictly lower loss. Without validation samples, every epoch runs and the last state is
    kept. Reseeds torch's global RNG (dropout) from `cfg.seed`. Raises FinetuneCancelled.

    With `checkpoint`, the loop's whole state is written there every `checkpoint_every_s` seconds and
    at each epoch's end, a matching checkpoint found there is resumed (the result equals an
    uninterrupted run's), and the file is removed when training ends (core/finetune_checkpoint.py)."""
    if not train:
        raise FinetuneError("no training samples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FinetuneError("the model has no trainable parameters (attach a trainable LoRA adapter first)")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    lengths = [len(s.ids) for s in train]
    has_valid = any(s.n_loss_tokens() for s in valid)

    fingerprint = training_fingerprint(cfg, train, valid) if checkpoint is not None else ""
    base = base_fingerprint(model) if checkpoint is not None else None
    best_state: dict[str, torch.Tensor] | None = None
    loop = LoopState()
    if checkpoint is not None and (resumed := load_checkpoint(checkpoint, fingerprint, model, opt, base)) is not None:
        loop, best_state = resumed
    stopped_early = bool(loop.history) and loop.stale >= cfg.patience
    epoch = loop.epoch - 1
    t0 = time.perf_counter() - loop.seconds
    last_save = time.perf_counter()

    def save() -> None:
        nonlocal last_save
        loop.seconds = time.perf_counter() - t0
        save_checkpoint(checkpoint, fingerprint, loop, model, opt, best_state, base)
        last_save = time.perf_counter()

    model.train()
    for epoch in range(loop.epoch, cfg.epochs + 1):
        if stopped_early:
            break
        if loop.epoch_rng is None:
            loop.epoch_rng = rng.bit_generator.state
        else:  # resumed: the epoch's shuffle as it was drawn, then skip the batches done
            rng.bit_generator.state = loop.epoch_rng
        if loop.batches_done == 0:
            loop.epoch_loss, loop.epoch_tokens, loop.lr = 0.0, 0, cfg.lr
        loop.epoch = epoch
        batches = epoch_batches(lengths, cfg.batch_size, cfg.micro_batch_size, rng, cfg.micro_batch_tokens)
        for index in range(loop.batches_done, len(batches)):
            batch = batches[index]
            n_tokens = sum(train[i].n_loss_tokens() for micro in batch for i in micro)
            if n_tokens:
                loop.step += 1
                loop.lr = cfg.lr * lr_multiplier(loop.step, total_steps, cfg.warmup_steps, cfg.lr_scheduler)
                for group in opt.param_groups:
                    group["lr"] = loop.lr
                opt.zero_grad(set_to_none=True)
                for micro in batch:
                    if cancel is not None and cancel():
                        raise FinetuneCancelled("fine-tuning cancelled")
                    summed = _summed_loss(model, *collate([train[i] for i in micro], pad_id, device), autocast)
                    (summed / n_tokens).backward()
                    loop.epoch_loss += float(summed.detach())
                loop.epoch_tokens += n_tokens
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
            loop.batches_done = index + 1
            if n_tokens and progress is not None:
                progress(min(1.0, loop.step / total_steps), f"epoch {epoch}/{cfg.epochs} step {loop.step} "
                         f"loss {loop.epoch_loss / max(loop.epoch_tokens, 1):.4f}")
            if checkpoint is not None and time.perf_counter() - last_save >= checkpoint_every_s:
                save()
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": loop.epoch_loss / max(loop.epoch_tokens, 1),
                                 "lr": loop.lr}
        message = f"epoch {epoch}/{cfg.epochs} train loss {entry['train_loss']:.4f}"
        if has_valid and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            valid_loss = mean_loss(model, valid, pad_id, micro_batch_size=cfg.micro_batch_size, device=device,
                                   autocast=autocast, cancel=cancel)
            model.train()
            entry["valid_loss"] = valid_loss
            if valid_loss < loop.best_loss:
                loop.best_loss, loop.best_epoch, loop.stale = valid_loss, epoch, 0
                best_state = trainable_state(model)
            else:
                loop.stale += 1
            message += f" valid loss {valid_loss:.4f} (best {loop.best_loss:.4f} @ {loop.best_epoch})"
            stopped_early = loop.stale >= cfg.patience
        loop.history.append(entry)
        log.info("finetune: %s", message)
        if progress is not None:
            progress(1.0 if stopped_early else min(1.0, loop.step / total_steps), message)
        loop.epoch, loop.batches_done, loop.epoch_rng = epoch + 1, 0, rng.bit_generator.state
        if checkpoint is not None and not stopped_early and epoch < cfg.epochs:
            save()
    seconds = time.perf_counter() - t0
    if best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    model.eval()
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return FinetuneResult(epochs_run=epoch, best_epoch=loop.best_epoch, stopped_early=stopped_early, steps=loop.step,
                          seconds=seconds, train_samples=len(train), valid_samples=len(valid), history=loop.history)


# ----------------------------------------------------------------------------------------------
# Model, adapter files, the whole run


def attach_trainable_lora(model, cfg: FinetuneConfig):
    """A trainable LoRA adapter: loaded from `cfg.adapter` (trainable), or fresh with the recipe's
    r / alpha / dropout / target modules, its random A drawn from `cfg.seed`."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    from core.effort.llm import LLMError

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if cfg.adapter:
        if not Path(cfg.adapter, "adapter_config.json").is_file():
            raise LLMError(f"adapter folder '{cfg.adapter}' has no adapter_config.json")
        return PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)


def lora_settings(peft_model) -> dict[str, Any]:
    """The LoRA shape actually trained (from a loaded adapter, it may differ from the config's)."""
    c = peft_model.peft_config["default"]
    return {"r": int(c.r), "lora_alpha": int(c.lora_alpha), "lora_dropout": float(c.lora_dropout),
            "target_modules": sorted(c.target_modules) if c.target_modules else []}


def check_out_dir(out_dir: Path) -> None:
    """`out_dir` must be absent, empty, or an earlier adapter folder (which is then replaced)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FinetuneError(f"--out '{out_dir}' exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (
            (out_dir / META_FILE).is_file() or (out_dir / "adapter_config.json").is_file()):
        raise FinetuneError(f"--out '{out_dir}' is not empty and holds no adapter; choose another folder")


def save_adapter(model, out_dir: Path, meta: dict[str, Any]) -> Path:
    """The adapter (peft `save_pretrained`) and `finetune.json`, written into a temporary sibling
    folder and renamed into place, so `out_dir` is never half written. An earlier adapter there is
    replaced."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def read_meta(adapter_dir: Path) -> dict[str, Any] | None:
    """`finetune.json` of an adapter folder written by `run_finetune`, or None."""
    path = Path(adapter_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _autocast(precision: str, dev: torch.device) -> Callable:
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        return lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return nullcontext


def run_finetune(ds: RecDataset, users: Sequence[int], cfg: FinetuneConfig, out_dir: Path, *,
                 cache_dir: Path | None = None, template: PromptTemplate | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 extra_meta: dict[str, Any] | None = None, checkpoint: Path | None = None) -> dict[str, Any]:
    """Fine-tune the configured LLM on the BIGRec samples of `users` (indices into `ds`; a set: order
    and duplicates do not matter), early-stopped on those users' validation samples, and write the
    adapter plus `finetune.json` to `out_dir` (atomically). Returns the metadata written. With
    `checkpoint`, an interrupted run resumes from that file (`train_lora`)."""
    from core.device import resolve_device
    from core.effort.llm import load_base_model, resolve_llm

    users = sorted({int(u) for u in users})
    if not users:
        raise FinetuneError("the selection is empty: nothing to fine-tune on")
    if users[0] < 0 or users[-1] >= ds.n_samples:
        raise FinetuneError(f"selected sample indices must lie in [0, {ds.n_samples})")
    check_out_dir(Path(out_dir))
    template = template or PromptTemplate()
    source = resolve_llm(cfg.llm, cfg.gguf_file)
    dev = resolve_device(cfg.device)
    if progress:
        progress(0.0, "loading the LLM")
    t0 = time.perf_counter()
    with uninterruptible(cancel, FinetuneCancelled, "loading the LLM"):
        model, tokenizer = load_base_model(source, cache_dir)
        model = attach_trainable_lora(model, cfg).to(dev)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = encode_users(ds, users, tokenizer, cfg.cutoff_len, template=template, split="train",
                         train_on_inputs=cfg.train_on_inputs)
    valid = encode_users(ds, users, tokenizer, cfg.cutoff_len, template=template, split="valid",
                         train_on_inputs=cfg.train_on_inputs)
    log.info("finetune: %d training samples (%.0f tokens mean), %d validation samples", len(train),
             np.mean([len(s.ids) for s in train]), len(valid))
    precision = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda") else "fp32"
    result = train_lora(model, train, valid, cfg, pad_id=pad_id, device=dev, autocast=_autocast(precision, dev),
                        progress=progress, cancel=cancel, checkpoint=checkpoint)
    meta = {
        "format": FORMAT,
        "base_model": {"llm": cfg.llm, "gguf_file": source.gguf_file, "path": str(source.folder.resolve()),
                       "key": source.key()},
        "start_adapter": cfg.adapter,
        "dataset_fingerprint": ds.fingerprint,
        "selection_fingerprint": selection_fingerprint(ds.fingerprint, (ds.user_ids[u] for u in users)),
        "n_selected": len(users),
        "recipe": {**cfg.model_dump(mode="json"), "lora": lora_settings(model),
                   "gradient_accumulation_steps": math.ceil(cfg.batch_size / cfg.micro_batch_size),
                   "loss": "token mean over each effective batch"},
        "template": template.model_dump(),
        "seed": cfg.seed,
        "device": str(dev),
        "precision": precision,
        "train_samples": result.train_samples,
        "valid_samples": result.valid_samples,
        "mean_train_tokens": float(np.mean([len(s.ids) for s in train])),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "history": result.history,
        "train_seconds": result.seconds,
        "seconds_per_sample": result.seconds_per_sample,
        "seconds": time.perf_counter() - t0,
        **(extra_meta or {}),
    }
    save_adapter(model, Path(out_dir), meta)
    return meta
