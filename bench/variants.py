"""Method variants for the quality bench: a pruning method plus option tokens, e.g.

    dealrec+resp+resid+robust     effort of the response loss, residual length correction, robust norm
    influence+hp=0                influence only without the hard prune
    dealrec+lam=1                 lambda 1.0

Tokens: `resp` (effort loss on the response only), `resid` (residual length correction of the effort),
`rank` / `robust` (normalisation of each score), `lam=F` (lambda), `hp=F` (hard-prune ratio),
`k=N` (strata), and for `random` only `match=M`: a random draw with exactly the history lengths of
method M's selection of the same seed and budget (bench/matched.py). A spec's cells are keyed by the
configuration it builds, so `dealrec` with no token is exactly the paper's method and keeps its
committed cells.
"""

from __future__ import annotations

from typing import Any

FLAGS: dict[str, tuple[str, str, Any]] = {
    "resp": ("effort", "loss", "response"),
    "resid": ("effort", "length_correction", "residual"),
    "rank": ("selection", "normalize", "rank"),
    "robust": ("selection", "normalize", "robust"),
}
VALUES: dict[str, tuple[str, str, type]] = {
    "lam": ("selection", "lambda", float),
    "hp": ("selection", "hard_prune", float),
    "k": ("selection", "strata", int),
    "match": ("bench", "match", str),  # not a pruning option: the quality bench draws the selection itself
}
WORDS = {"resp": "response loss", "resid": "length-residual effort", "rank": "rank norm", "robust": "robust norm",
         "lam": "λ", "hp": "hard prune", "k": "strata"}


class VariantError(ValueError):
    pass


def parse(spec: str, methods: tuple[str, ...]) -> tuple[str, dict[str, dict[str, Any]]]:
    """(base method, {"selection": {...}, "effort": {...}} overrides) of a spec."""
    base, *tokens = spec.split("+")
    if base not in methods:
        raise VariantError(f"unknown method '{base}' in '{spec}' (choose from {', '.join(methods)})")
    overrides: dict[str, dict[str, Any]] = {}
    for token in tokens:
        if token in FLAGS:
            section, key, value = FLAGS[token]
        elif "=" in token and token.split("=", 1)[0] in VALUES:
            name, text = token.split("=", 1)
            section, key, kind = VALUES[name]
            try:
                value = kind(text)
            except ValueError:
                raise VariantError(f"'{token}' in '{spec}': {text!r} is not a {kind.__name__}") from None
        else:
            raise VariantError(f"unknown option '{token}' in '{spec}' (flags: {', '.join(FLAGS)}; "
                               f"values: {', '.join(k + '=' for k in VALUES)})")
        overrides.setdefault(section, {})[key] = value
    if "match" in overrides.get("bench", {}):
        ref = overrides["bench"]["match"]
        if base != "random" or len(tokens) != 1:
            raise VariantError(f"'{spec}': match= goes alone with random (random+match=M)")
        if ref not in methods or ref == "random":
            raise VariantError(f"'{spec}': match= names another pruning method ({', '.join(methods)})")
    return base, overrides


def matched_reference(spec: str) -> str | None:
    """The method whose selection a `random+match=M` spec copies the history lengths of, or None."""
    _, _, rest = spec.partition("+match=")
    return rest or None


def base_method(spec: str) -> str:
    return spec.split("+", 1)[0]


def label(spec: str, base_labels: dict[str, str]) -> str:
    """A readable row name: the base method's label and its options in words."""
    base, *tokens = spec.split("+")
    words = []
    for token in tokens:
        name, _, value = token.partition("=")
        if name == "match":
            words.append(f"history lengths of {base_labels.get(value, value)}")
            continue
        words.append(f"{WORDS.get(name, name)} {value}" if value else WORDS.get(name, name))
    return base_labels.get(base, base) + (f" ({', '.join(words)})" if words else "")
