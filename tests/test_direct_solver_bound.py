"""The `direct` influence solver is refused where its dense float64 Hessian would pass 1 GiB (2.1 GB at
surrogate.hidden_size 128, 12.8 GB at 200: enough to kill a worker). The rule (core.params.check_direct_solver)
names the fields and the solvers that need no Hessian; the CLI says it with its flag; the service answers
it as a 422 (tests/service/test_service_jobs.py). It adds no config field: defaults and cache keys stay."""

from __future__ import annotations

import pytest
import torch

from core.cli.common import usage_error
from core.config import PruneConfig, SurrogateConfig
from core.params import (
    MAX_DIRECT_HESSIAN_BYTES,
    ParamsError,
    PruneOverrides,
    direct_hessian_bytes,
    resolve,
)
from core.surrogate.model import SASRec


def _resolve(hidden: int, solver: str, heads: int = 2) -> PruneConfig:
    return resolve(PruneOverrides(method="influence", budget=5, surrogate={"hidden_size": hidden, "num_heads": heads},
                                  influence={"solver": solver}), n_samples=100)


@pytest.mark.parametrize("hidden", [8, 64])
def test_the_size_is_the_models_own(hidden):
    """The rule's premise: every Linear of SASRec, the influence parameter among them, is hidden x hidden,
    and the Hessian the solver builds has (its size)^2 float64 values."""
    cfg = SurrogateConfig(hidden_size=hidden)
    model = SASRec(n_items=5, cfg=cfg)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.numel() == hidden * hidden for m in linears)
    theta = model.influence_layer(PruneConfig().influence.parameter).weight
    assert direct_hessian_bytes(cfg) == theta.numel() ** 2 * torch.finfo(torch.float64).bits // 8


def test_direct_is_refused_past_the_bound_naming_the_fields():
    assert _resolve(64, "direct").influence.solver == "direct"  # the default size: 134 MB
    assert direct_hessian_bytes(SurrogateConfig(hidden_size=106)) <= MAX_DIRECT_HESSIAN_BYTES
    assert _resolve(106, "direct").surrogate.hidden_size == 106  # the largest under 1 GiB with 2 heads
    for hidden in (108, 128, 200):
        with pytest.raises(ParamsError) as exc:
            _resolve(hidden, "direct")
        err = exc.value
        assert err.field == "influence.solver", err
        for words in (f"surrogate.hidden_size {hidden}", "'lissa' or 'cg'", "at most 106", "1 GiB"):
            assert words in err.message, (words, err.message)
    # The largest size it suggests is one the heads divide.
    with pytest.raises(ParamsError, match="at most 96 with 'direct'"):
        _resolve(128, "direct", heads=16)
    # Without a dense Hessian any size is fine.
    for solver in ("lissa", "cg"):
        assert _resolve(200, solver).influence.solver == solver


def test_the_cli_names_its_flag():
    with pytest.raises(ParamsError) as exc:
        _resolve(128, "direct")
    message = str(usage_error(exc.value))
    assert message.startswith("--solver 'direct' builds the dense float64 Hessian"), message
    assert "2.00 GiB" in message and "surrogate.hidden_size 128" in message


def test_the_rule_adds_no_field():
    """Defaults and everything keyed by a config dump stay as they were."""
    assert set(PruneConfig().influence.model_dump()) == {"parameter", "solver", "lissa_steps", "damping", "scale",
                                                         "cg_max_iter", "cg_tol", "batch_size"}
    assert PruneConfig().surrogate.hidden_size == 64 and PruneConfig().influence.solver == "lissa"


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_influence_parameters_are_the_surrogates_linear_layers(layers):
    """core.params names SASRec's Linear layers without importing torch (the API validates requests
    with it): the list must stay the model's, and every name must resolve to one."""
    from core.params import influence_parameters

    cfg = SurrogateConfig(num_layers=layers)
    model = SASRec(n_items=5, cfg=cfg)
    names = influence_parameters(cfg)
    assert names[0] == "last_attention_output"
    assert names[1:] == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(model.influence_layer(n), torch.nn.Linear) for n in names)


def test_an_unknown_influence_parameter_is_refused_before_training():
    ok = resolve(PruneOverrides(method="influence", budget=5, influence={"parameter": "blocks.1.ffn.fc2"}),
                 n_samples=100)
    assert ok.influence.parameter == "blocks.1.ffn.fc2"
    for bad in ("0", "blocks.2.ffn.fc2", "item_embeddings", "blocks.0.attention"):
        with pytest.raises(ParamsError) as exc:
            resolve(PruneOverrides(method="influence", budget=5, influence={"parameter": bad}), n_samples=100)
        assert exc.value.field == "influence.parameter"
        assert f"'{bad}' is not a Linear layer" in exc.value.message and "blocks.1.attention.dense" in exc.value.message
    # A method without influence never reads it (a job queued before the check existed still runs).
    assert resolve(PruneOverrides(method="random", budget=5, influence={"parameter": "0"}), n_samples=100)
