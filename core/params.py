"""The one way from caller-level settings to a validated `PruneConfig`.

The CLI's flags, a REST request and a bench cell all describe a run the same way: a method, a
budget (a count or a ratio of the samples), a seed, and a few overrides of the paper's defaults.
They build `PruneOverrides` (flat and all optional: None = the default) and call `resolve` once the
number of samples is known. The budget rule, the method's own defaults and the first-error message
live here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.config import PruneConfig, SurrogateConfig


class ParamsError(ValueError):
    """A parameter that cannot be used; `field` names it (dotted, e.g. "selection.budget")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def first_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> ParamsError:
    """A pydantic error as one message naming its field (the first problem is the one to fix first)."""
    first = exc.errors()[0]
    field = ".".join([*prefix, *(str(x) for x in first["loc"])])
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return ParamsError(field, message)


def validated(model: type[BaseModel], raw: dict[str, Any], prefix: tuple[str, ...] = ()) -> Any:
    """`model.model_validate(raw)`, a ValidationError becoming a ParamsError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise first_error(exc, prefix) from None


def without_none(**values: Any) -> dict[str, Any]:
    """The given keyword arguments that are set (None = leave the default)."""
    return {k: v for k, v in values.items() if v is not None}


# The largest budget count: far above any dataset's samples (a larger one selects every sample anyway).
MAX_BUDGET = 10**9


def check_budget(value: int | float | str) -> int | float:
    """A budget as the user wrote it: a whole count >= 1, or a ratio of the samples in (0, 1).
    Returns an int (count) or a float (ratio); raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number >= 1 or a ratio between 0 and 1")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"'{value}' is neither a count nor a ratio") from None
    if isinstance(value, float):
        if 0 < value < 1:
            return value
        # not math.isfinite: int(inf) raises OverflowError, which a caller expecting ValueError misses
        if 1 <= value <= MAX_BUDGET and value == int(value):
            return int(value)
        raise ValueError(f"must be a whole number between 1 and {MAX_BUDGET} or a ratio between 0 and 1")
    if value < 1:
        raise ValueError("must be at least 1")
    if value > MAX_BUDGET:
        raise ValueError(f"must be at most {MAX_BUDGET} (a count of samples)")
    return int(value)


def parse_budget(value: int | float | str, n_samples: int) -> int:
    """The number of samples a budget asks for: a count as is, a ratio r as max(1, int(r * N))."""
    budget = check_budget(value)
    return max(1, int(budget * n_samples)) if isinstance(budget, float) else budget


class PruneOverrides(BaseModel):
    """What a caller may set for one pruning run; None everywhere means the paper's defaults.
    `surrogate` and `influence` take any fields of those configs."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str = "dealrec"
    budget: int | float | str = 1024
    seed: int = 0
    # selection
    lam: float | None = Field(None, alias="lambda")
    strata: int | None = None
    hard_prune: float | None = None
    normalize: Literal["minmax", "rank", "robust"] | None = None
    # stages before it
    surrogate: dict[str, Any] = Field(default_factory=dict)
    influence: dict[str, Any] = Field(default_factory=dict)
    # effort
    llm: str | None = None
    gguf_file: str | None = None
    adapter: str | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    precision: Literal["auto", "fp32", "bf16"] | None = None
    cutoff_len: int | None = None
    effort_processes: int | None = None
    effort_loss: Literal["prompt", "response"] | None = None
    effort_length_correction: Literal["none", "residual"] | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None


# The most memory the `direct` influence solver's dense Hessian may take. It is float64 and holds
# (parameter size)^2 values: 134 MB at the default hidden size 64, 2.1 GB at 128, 12.8 GB at 200, more
# than a worker should take for one matrix (solving it copies it twice more: + damping I, Cholesky).
MAX_DIRECT_HESSIAN_BYTES = 1 << 30


def direct_hessian_bytes(surrogate: SurrogateConfig) -> int:
    """Bytes of the dense float64 Hessian `influence.solver = "direct"` builds. The influence parameter
    is the weight of one nn.Linear of SASRec, and every one of them is hidden_size x hidden_size
    (core/surrogate/model.py; tests/test_direct_solver_bound.py checks it), so the Hessian holds
    hidden_size^4 values, whichever layer `influence.parameter` names."""
    n = surrogate.hidden_size ** 2
    return 8 * n * n


def check_direct_solver(cfg: PruneConfig) -> None:
    """Refuse `direct` where its Hessian would pass MAX_DIRECT_HESSIAN_BYTES (ParamsError on
    influence.solver, naming surrogate.hidden_size, the size, and the solvers that need no Hessian)."""
    if cfg.influence.solver != "direct":
        return
    size = direct_hessian_bytes(cfg.surrogate)
    if size <= MAX_DIRECT_HESSIAN_BYTES:
        return
    largest = int(round((MAX_DIRECT_HESSIAN_BYTES / 8) ** 0.25)) + 1
    while 8 * largest ** 4 > MAX_DIRECT_HESSIAN_BYTES:  # the float root may be one off either way
        largest -= 1
    largest -= largest % cfg.surrogate.num_heads  # a hidden size the heads divide
    n = cfg.surrogate.hidden_size ** 2
    raise ParamsError("influence.solver", (
        f"'direct' builds the dense float64 Hessian of the influence parameter, {n:,} x {n:,} values at "
        f"surrogate.hidden_size {cfg.surrogate.hidden_size}: {size / (1 << 30):.2f} GiB, over the "
        f"{MAX_DIRECT_HESSIAN_BYTES / (1 << 30):g} GiB it may take; use influence.solver 'lissa' or 'cg' (they "
        f"never build it), or a surrogate.hidden_size of at most {largest} with 'direct'"))


# The Linear layers of the SASRec surrogate (core/surrogate/model.py; tests/test_direct_solver_bound.py
# keeps this list equal to the model's): named here so that a request is checked without importing torch.
_BLOCK_LINEARS = ("attention.query", "attention.key", "attention.value", "attention.dense", "ffn.fc1", "ffn.fc2")


def influence_parameters(surrogate: SurrogateConfig) -> list[str]:
    """The values `influence.parameter` may take for this surrogate: the reference's alias, then every
    Linear layer's dotted path."""
    return ["last_attention_output"] + [f"blocks.{i}.{name}" for i in range(surrogate.num_layers)
                                        for name in _BLOCK_LINEARS]


def check_influence_parameter(cfg: PruneConfig) -> None:
    """Refuse an influence parameter the surrogate does not have (ParamsError on influence.parameter)
    at once, rather than after the surrogate has trained; a method that computes no influence never
    reads it, so it is not checked there."""
    from core.selection import required_scores

    if "influence" not in required_scores(cfg.selection.method):
        return
    allowed = influence_parameters(cfg.surrogate)
    if cfg.influence.parameter not in allowed:
        raise ParamsError("influence.parameter", f"'{cfg.influence.parameter}' is not a Linear layer of the "
                          f"surrogate; one of {', '.join(allowed)}")


def resolve(overrides: PruneOverrides, n_samples: int) -> PruneConfig:
    """The `PruneConfig` of a run on `n_samples` samples: the method's own defaults (its registry
    entry) beneath the caller's overrides, the budget resolved against N, one seed for every stage
    but the effort (whose LoRA seed stays the default, so the effort scores are shared by all seeds).
    Raises ParamsError naming the first bad field, or the field of a rule across fields it breaks
    (`check_direct_solver`, `check_influence_parameter`)."""
    from core.selection.methods import get_method

    o = overrides
    try:
        method = get_method(o.method)
    except ValueError as exc:
        raise ParamsError("selection.method", str(exc)) from None
    try:
        budget = parse_budget(o.budget, n_samples)
    except ValueError as exc:
        raise ParamsError("selection.budget", str(exc)) from None
    defaults = {k: dict(v) for k, v in method.defaults.items()}
    raw = {
        "seed": o.seed,
        "selection": {**defaults.get("selection", {}), "method": o.method, "budget": budget, "seed": o.seed,
                      **without_none(**{"lambda": o.lam}, strata=o.strata, hard_prune=o.hard_prune,
                                     normalize=o.normalize)},
        "surrogate": {**defaults.get("surrogate", {}), **o.surrogate},
        "influence": {**defaults.get("influence", {}), **o.influence},
        "effort": {**defaults.get("effort", {}),
                   **without_none(llm=o.llm, gguf_file=o.gguf_file, adapter=o.adapter, device=o.device,
                                  precision=o.precision, cutoff_len=o.cutoff_len, processes=o.effort_processes,
                                  loss=o.effort_loss, length_correction=o.effort_length_correction,
                                  lora_r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout)},
    }
    cfg = validated(PruneConfig, raw)
    check_direct_solver(cfg)
    check_influence_parameter(cfg)
    return cfg
