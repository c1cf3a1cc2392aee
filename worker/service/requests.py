"""The prune request (what `POST /v1/prune` accepts) and its translation into core's configs.

Shared by the API (validation, 422s) and the worker (building the config), so both read one contract.
The translation is core's one resolver (`core.params.resolve`), the one `dealrec prune` uses: the
same request and seed give the same `PruneConfig`, hence the same selection as the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from core.config import MAX_USERS, FinetuneConfig, InfluenceConfig, LLMEvalConfig, PruneConfig, SurrogateConfig
from core.params import MAX_BUDGET, PruneOverrides, check_budget, resolve, validated, without_none
from core.selection.methods import method_names
from worker.service.jobstore import id_pattern

# The registry's methods, as the schema's enum (core/selection/methods.py).
Method = Literal[method_names()]


class _Forbid(BaseModel):
    # allow_inf_nan=False: Infinity / NaN in a request are a 422, like any out-of-range number
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class EffortParams(_Forbid):
    """The LLM settings a client may choose. `llm` is a name the server configured
    (`DEALREC_LLMS`), never a path; the device is the worker's (`DEALREC_DEVICE`)."""

    llm: str = Field("auto", max_length=100, examples=["auto"])
    lora_r: int | None = Field(None, ge=1, le=256)
    lora_alpha: int | None = Field(None, ge=1, le=1024)
    lora_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    cutoff_len: int | None = Field(None, ge=16, le=32768)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    loss: Literal["prompt", "response"] | None = Field(
        None, description="effort of the loss over the whole prompt (the reference, default) or the response only")
    length_correction: Literal["none", "residual"] | None = Field(
        None, description="residual: log-effort minus its fit on log prompt tokens over the pool (none)")


class PruneParams(_Forbid):
    lam: float | None = Field(None, ge=0.0, le=1000.0, alias="lambda", description="effort weight (paper, Games: 0.3)")
    strata: int | None = Field(None, ge=1, le=100_000, description="number of strata k (50)")
    hard_prune: float | None = Field(None, ge=0.0, lt=1.0, description="share of highest scores dropped (0.1)")
    normalize: Literal["minmax", "rank", "robust"] | None = Field(
        None, description="scaling of each score before they are combined (minmax, the paper's)")
    surrogate: SurrogateConfig = SurrogateConfig()
    influence: InfluenceConfig = InfluenceConfig()
    effort: EffortParams = EffortParams()


class EvaluateParams(_Forbid):
    """LLM-level evaluation after fine-tuning (BIGRec grounding; core's LLMEvalConfig defaults)."""

    test_users: int | None = Field(None, ge=1, le=MAX_USERS,
                                   description="a seeded random subset of N users with a test item (all)")
    num_beams: int | None = Field(None, ge=1, le=16, description="beam search width (4)")
    max_new_tokens: int | None = Field(None, ge=1, le=1024, description="longest generated title (128)")
    exclude_seen: bool = False


class FinetuneParams(_Forbid):
    """LoRA fine-tuning of the job's LLM (`params.effort.llm`) on the selected samples, after the
    selection; omitted fields take the reference's BIGRec recipe (core's FinetuneConfig)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{
        "epochs": 2, "micro_batch_size": 4, "evaluate": {"test_users": 500, "num_beams": 4}}]})

    epochs: int | None = Field(None, ge=1, le=1000, description="most epochs (50), early-stopped on validation loss")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="AdamW learning rate (1e-4)")
    batch_size: int | None = Field(None, ge=1, le=4096, description="effective batch (128)")
    micro_batch_size: int | None = Field(None, ge=1, le=1024, description="samples per forward pass (4)")
    warmup_steps: int | None = Field(None, ge=0, le=100_000)
    patience: int | None = Field(None, ge=1, le=1000)
    cutoff_len: int | None = Field(None, ge=16, le=32768)
    lora_r: int | None = Field(None, ge=1, le=256)
    lora_alpha: int | None = Field(None, ge=1, le=1024)
    lora_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    evaluate: EvaluateParams | None = Field(EvaluateParams(), description="null: fine-tune without evaluating")


class PruneRequest(_Forbid):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False,
                              json_schema_extra={"examples": [{
        "dataset_id": "ds_0193b0c1d2e3a1b2c3d4e5", "budget": 64, "method": "dealrec", "seed": 0,
        "limit_users": 600, "params": {"lambda": 0.3, "strata": 50, "hard_prune": 0.1,
                                       "surrogate": {"epochs": 200}, "influence": {"solver": "lissa"}}}]})

    # A malformed id is answered 404 as an unknown one is: the pattern is stated for clients, not checked here.
    dataset_id: str = Field(..., max_length=64, json_schema_extra={"pattern": id_pattern("ds")})
    # check_budget enforces the bounds and that a number >= 1 is whole. The schema says the same: a number
    # in (0, 1e9] that is whole or below 1 (JSON Schema's integer holds 64.0 too, as check_budget does);
    # it replaces pydantic's anyOf of the two types, which let 1.5 through.
    budget: StrictInt | StrictFloat = Field(
        1024, description="samples to select: a count (64, at most 1e9) or a ratio of the samples in (0, 1) (0.02)",
        json_schema_extra={"type": "number", "exclusiveMinimum": 0, "maximum": MAX_BUDGET,
                           "anyOf": [{"type": "integer"}, {"exclusiveMaximum": 1}]})
    method: Method = "dealrec"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    limit_users: int | None = Field(None, ge=1, le=MAX_USERS, description="keep only the first N users")
    split: Literal["chrono", "loo"] = Field("chrono",
                                            description="interaction logs: chronological 8:1:1 or leave-one-out")
    params: PruneParams = PruneParams()
    finetune: FinetuneParams | None = Field(None, description="fine-tune (and evaluate) the LLM on the selection")
    warm_start: bool = Field(True, description="on a version of another dataset: start the surrogate from the one a "
                                               "job with the same settings trained on the previous version (early-"
                                               "stopped as usual); false: train it from scratch")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: int | float) -> int | float:
        return check_budget(v)


def to_config(req: PruneRequest, n_samples: int, *, device: str = "auto", llm_path: str = "auto") -> PruneConfig:
    """The core configuration of a request, once the dataset's sample count is known (raises
    core.params.ParamsError naming the field)."""
    p, e = req.params, req.params.effort
    return resolve(PruneOverrides(
        method=req.method, budget=req.budget, seed=req.seed, lam=p.lam, strata=p.strata, hard_prune=p.hard_prune,
        normalize=p.normalize, surrogate=p.surrogate.model_dump(), influence=p.influence.model_dump(), llm=llm_path,
        device=device, precision=e.precision, cutoff_len=e.cutoff_len, effort_loss=e.loss,
        effort_length_correction=e.length_correction, lora_r=e.lora_r, lora_alpha=e.lora_alpha,
        lora_dropout=e.lora_dropout), n_samples)


def to_finetune_config(req: PruneRequest, *, device: str = "auto", llm_path: str = "auto") -> FinetuneConfig:
    """The fine-tuning recipe of a request: the job's LLM and seed, the request's overrides."""
    f = req.finetune or FinetuneParams()
    return validated(FinetuneConfig, {
        "llm": llm_path, "device": device, "seed": req.seed,
        **without_none(epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, micro_batch_size=f.micro_batch_size,
                       warmup_steps=f.warmup_steps, patience=f.patience, cutoff_len=f.cutoff_len, lora_r=f.lora_r,
                       lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout)}, ("finetune",))


def to_eval_config(req: PruneRequest, adapter: str, *, device: str = "auto", llm_path: str = "auto") -> LLMEvalConfig:
    e = (req.finetune.evaluate if req.finetune else None) or EvaluateParams()
    cutoff = req.finetune.cutoff_len if req.finetune else None
    return validated(LLMEvalConfig, {
        "llm": llm_path, "adapter": adapter, "device": device, "seed": req.seed, "exclude_seen": e.exclude_seen,
        **without_none(test_users=e.test_users, num_beams=e.num_beams, max_new_tokens=e.max_new_tokens,
                       cutoff_len=cutoff)}, ("finetune", "evaluate"))
