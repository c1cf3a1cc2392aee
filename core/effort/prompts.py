"""BIGRec / Alpaca prompts built from item titles, cut to the LLM's context budget.

Wording and template follow the DEALRec reference for Games; other domains override the two
sentences through `PromptTemplate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from core.data.dataset import RecDataset

ALPACA_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
)


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str = ("Given the game products that the user purchased before, please recommend a new "
                        "game product that the user likes to the user.")
    input_prefix: str = "The user has purchased the following game products before, with titles as: "
    separator: str = "; "


def clean_title(title: str) -> str:
    # The reference strips newlines from titles; a newline would also break the template's sections.
    return " ".join(title.split())


def format_prompt(instruction: str, input_text: str, output: str) -> str:
    return (f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}"
            f"\n\n### Response:\n{output}")


@dataclass(frozen=True)
class SampleRecord:
    """One training sample as the LLM sees it; `kept` = how many of the most recent history items
    survived the cut to `cutoff_len` tokens."""

    instruction: str
    input: str
    output: str
    kept: int

    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input, self.output)

    def to_json(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


Split = Literal["train", "valid", "test"]


def split_lines(ds: RecDataset, user: int, split: Split = "train") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(history, targets) of one user's sample for a split, as the reference builds BIGRec data:
    train = training line minus its last item -> that item; valid = the whole training line -> the
    validation item(s); test = training line + validation items -> the test item(s). Targets may be
    empty (a user without a validation or test item)."""
    if split == "train":
        return ds.history(user), (ds.target(user),)
    if split == "valid":
        return ds.train[user], ds.valid[user]
    if split == "test":
        return ds.train[user] + ds.valid[user], ds.test[user]
    raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")


def make_record(ds: RecDataset, user: int, template: PromptTemplate, kept: int | None = None,
                split: Split = "train") -> SampleRecord:
    """The user's record for `split`: output = the (first) target's title for train and valid; empty
    for test, whose record is the generation prompt (the answer is what the LLM writes)."""
    history, targets = split_lines(ds, user, split)
    if split != "test" and not targets:
        raise ValueError(f"user {user} has no {split} item")
    if kept is not None:
        history = history[len(history) - kept:] if kept else ()
    titles = template.separator.join(clean_title(ds.item_titles[i - 1]) for i in history)
    output = "" if split == "test" else clean_title(ds.item_titles[targets[0] - 1])
    return SampleRecord(template.instruction, template.input_prefix + titles, output, len(history))


@dataclass(frozen=True)
class TokenizedSample:
    user: int
    ids: tuple[int, ...]  # the full prompt with EOS, at most cutoff_len tokens
    kept: int
    # Index of the first response token (the target title) in `ids`; len(ids) for a test prompt,
    # whose response is what the LLM writes. Loss terms from here on are the response's.
    response_from: int = 0


def tokenize_samples(ds: RecDataset, users: Sequence[int], tokenizer, cutoff_len: int,
                     template: PromptTemplate | None = None, split: Split = "train") -> list[TokenizedSample]:
    """Tokenise each user's prompt as the reference does (the tokenizer's own special tokens, e.g.
    Llama's BOS, then EOS appended) and drop the oldest history items until it fits
    `cutoff_len` tokens. The reference's own cut left ~300 Games prompts over 512; this one cannot:
    if even an empty history does not fit (a huge target title), the ids are cut hard at the limit.

    `split` picks the sample (see `split_lines`); a "test" prompt ends at "### Response:\n" with no
    EOS (generation continues it), and is cut so that it alone fits `cutoff_len`."""
    template = template or PromptTemplate()
    eos = tokenizer.eos_token_id if split != "test" else None
    records = [make_record(ds, u, template, split=split) for u in users]
    encoded = tokenizer([r.prompt() for r in records])["input_ids"]
    cut: list[tuple[int, list[int], SampleRecord]] = []
    for u, rec, ids in zip(users, records, encoded):
        if _with_eos_len(ids, eos) > cutoff_len:
            kept, ids = _fit(ds, u, template, tokenizer, cutoff_len, rec.kept, split)
            rec = make_record(ds, u, template, kept, split)
        ids = list(ids) if eos is None or (ids and ids[-1] == eos) else list(ids) + [eos]
        cut.append((int(u), ids[:cutoff_len], rec))
    if split == "test":
        return [TokenizedSample(u, tuple(ids), rec.kept, len(ids)) for u, ids, rec in cut]
    heads = tokenizer([format_prompt(rec.instruction, rec.input, "") for _, _, rec in cut])["input_ids"] if cut else []
    return [TokenizedSample(u, tuple(ids), rec.kept, _response_start(ids, head))
            for (u, ids, rec), head in zip(cut, heads)]


def template_prefix_tokens(tokenizer, template: PromptTemplate | None = None) -> int:
    """How many leading tokens every prompt of `template` shares whatever its history and target:
    the common prefix of two renderings that differ right after the template's input prefix, less
    one token (a merge across that boundary can never reach into it)."""
    template = template or PromptTemplate()
    a = tokenizer(format_prompt(template.instruction, template.input_prefix + "a", "a"))["input_ids"]
    b = tokenizer(format_prompt(template.instruction, template.input_prefix + "z", "z"))["input_ids"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return max(0, n - 1)


def _response_start(ids: Sequence[int], head: Sequence[int]) -> int:
    """First position of the response in `ids`, given `head` = the prompt tokenised without its
    response: len(head) where that is a prefix of `ids` (the usual case), otherwise the first position
    where the two differ (a tokenizer that merged across the boundary). At least the last token (EOS)
    is always in the response."""
    n, limit = 0, min(len(head), len(ids))
    while n < limit and head[n] == ids[n]:
        n += 1
    return max(1, min(n, len(ids) - 1))


def _with_eos_len(ids: Sequence[int], eos: int | None) -> int:
    return len(ids) + (0 if eos is None or (ids and ids[-1] == eos) else 1)


def _fit(ds: RecDataset, user: int, template: PromptTemplate, tokenizer, cutoff_len: int,
         n_history: int, split: Split = "train") -> tuple[int, list[int]]:
    """Largest number of recent history items whose prompt (+ EOS, except for test prompts) fits,
    by binary search (token count grows with the number of items kept)."""
    eos = tokenizer.eos_token_id if split != "test" else None

    def encode(k: int) -> list[int]:
        return tokenizer(make_record(ds, user, template, k, split).prompt())["input_ids"]

    lo, hi = 0, n_history  # invariant: answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _with_eos_len(encode(mid), eos) <= cutoff_len:
            lo = mid
        else:
            hi = mid - 1
    return lo, encode(lo)
