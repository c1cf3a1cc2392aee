"""BIGRec / Alpaca prompts built from item titles, cut to the LLM's context budget.

Wording and template follow the DEALRec reference for Games; other domains override the two
sentences through `PromptTemplate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def make_record(ds: RecDataset, user: int, template: PromptTemplate, kept: int | None = None) -> SampleRecord:
    history = ds.history(user)
    if kept is not None:
        history = history[len(history) - kept:] if kept else ()
    titles = template.separator.join(clean_title(ds.item_titles[i - 1]) for i in history)
    return SampleRecord(template.instruction, template.input_prefix + titles,
                        clean_title(ds.item_titles[ds.target(user) - 1]), len(history))


@dataclass(frozen=True)
class TokenizedSample:
    user: int
    ids: tuple[int, ...]  # the full prompt with EOS, at most cutoff_len tokens
    kept: int


def tokenize_samples(ds: RecDataset, users: Sequence[int], tokenizer, cutoff_len: int,
                     template: PromptTemplate | None = None) -> list[TokenizedSample]:
    """Tokenise each user's prompt as the reference does (the tokenizer's own special tokens, e.g.
    Llama's BOS, then EOS appended) and drop the oldest history items until it fits
    `cutoff_len` tokens. The reference's own cut left ~300 Games prompts over 512; this one cannot:
    if even an empty history does not fit (a huge target title), the ids are cut hard at the limit."""
    template = template or PromptTemplate()
    eos = tokenizer.eos_token_id
    records = [make_record(ds, u, template) for u in users]
    encoded = tokenizer([r.prompt() for r in records])["input_ids"]
    out: list[TokenizedSample] = []
    for u, rec, ids in zip(users, records, encoded):
        kept = rec.kept
        if _with_eos_len(ids, eos) > cutoff_len:
            kept, ids = _fit(ds, u, template, tokenizer, cutoff_len, rec.kept)
        ids = list(ids) if ids and ids[-1] == eos else list(ids) + [eos]
        out.append(TokenizedSample(int(u), tuple(ids[:cutoff_len]), kept))
    return out


def _with_eos_len(ids: Sequence[int], eos: int) -> int:
    return len(ids) + (0 if ids and ids[-1] == eos else 1)


def _fit(ds: RecDataset, user: int, template: PromptTemplate, tokenizer, cutoff_len: int,
         n_history: int) -> tuple[int, list[int]]:
    """Largest number of recent history items whose prompt + EOS fits, by binary search (token
    count grows with the number of items kept)."""

    def encode(k: int) -> list[int]:
        return tokenizer(make_record(ds, user, template, k).prompt())["input_ids"]

    lo, hi = 0, n_history  # invariant: answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _with_eos_len(encode(mid), tokenizer.eos_token_id) <= cutoff_len:
            lo = mid
        else:
            hi = mid - 1
    return lo, encode(lo)
