"""Every number a run can be configured with has an upper bound (issue 14: epochs = 1e9, lissa_steps =
1e12 were accepted and ran until the task's time limit): the core configs reachable from PruneConfig,
FinetuneConfig and LLMEvalConfig, and the service's request. Found by walking each model's JSON schema,
so a field added without a bound fails here; a value past each bound is refused naming that field;
the defaults lie within the bounds. The service test (tests/service/test_service_bounds.py) checks
the same bounds in /openapi.json and as 422s."""

from __future__ import annotations

import copy
import re

import pytest
from pydantic import BaseModel, ValidationError

from core.config import FinetuneConfig, LLMEvalConfig, PruneConfig
from tests.schema_bounds import Number, numbers, over
from worker.service.requests import PruneRequest

REQUIRED = {PruneRequest: {"dataset_id": "ds_0193b0c1d2e3a1b2c3d4e5"}}

# Numbers left without an upper bound on purpose, by model and path. Seeds only: a seed picks a random
# stream and multiplies no work, and a bound would refuse seeds that runs were already keyed by. (The
# request bounds its own seed, which every seed of a job's configs is set from.)
UNBOUNDED = {
    PruneConfig: {"seed", "effort.seed", "selection.seed"},
    FinetuneConfig: {"seed"},
    LLMEvalConfig: {"seed"},
    PruneRequest: set(),
}
MODELS = list(UNBOUNDED)


def _numbers(model: type[BaseModel]) -> list[Number]:
    return numbers(model.model_json_schema())


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_number_has_an_upper_bound(model):
    found = _numbers(model)
    unbounded = {n.path for n in found if n.maximum is None}
    assert unbounded == UNBOUNDED[model], f"numbers without an upper bound: {sorted(unbounded - UNBOUNDED[model])}"


def test_the_walk_reaches_every_nested_config():
    paths = {m: {n.path for n in _numbers(m)} for m in MODELS}
    assert {"surrogate.epochs", "surrogate.eval_every", "surrogate.patience", "surrogate.batch_size",
            "influence.lissa_steps", "influence.cg_max_iter", "influence.batch_size", "effort.max_batch_tokens",
            "effort.cutoff_len", "effort.processes", "selection.budget", "selection.lambda",
            "selection.strata"} <= paths[PruneConfig]
    assert {"epochs", "batch_size", "micro_batch_size", "micro_batch_tokens", "warmup_steps", "eval_every",
            "patience", "adam_betas[0]", "adam_betas[1]"} <= paths[FinetuneConfig]
    assert {"test_users", "num_beams", "max_new_tokens", "batch_size", "embed_batch_size", "ks[]"} \
        <= paths[LLMEvalConfig]
    assert {"budget", "limit_users", "params.surrogate.epochs", "params.influence.lissa_steps", "params.strata",
            "finetune.epochs", "finetune.warmup_steps", "finetune.evaluate.test_users",
            "finetune.evaluate.num_beams", "finetune.evaluate.max_new_tokens"} <= paths[PruneRequest]


def _default_dump(model: type[BaseModel]) -> dict:
    return model.model_validate(REQUIRED.get(model, {})).model_dump(mode="json", by_alias=True)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_the_defaults_are_within_the_bounds(model):
    # pydantic does not validate defaults: the dump of a default instance must validate again.
    model.model_validate(_default_dump(model))


def _set(raw: dict, path: str, value) -> dict:
    raw = copy.deepcopy(raw)
    parts = re.findall(r"[^.\[\]]+|\[\d*\]", path)
    node = raw
    for part, nxt in zip(parts, [*parts[1:], None]):
        last = nxt is None
        if part.startswith("["):
            continue
        if nxt is not None and nxt.startswith("["):
            index = int(nxt[1:-1] or 0)
            items = list(node.get(part) or [value])
            items[index] = value
            node[part] = items
            return raw
        if last:
            node[part] = value
        else:
            node[part] = dict(node.get(part) or {})
            node = node[part]
    return raw


def _loc(err: dict) -> str:
    out = ""
    for x in err["loc"]:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_a_value_past_each_bound_is_refused_naming_its_field(model):
    base = _default_dump(model)
    checked = 0
    for n in _numbers(model):
        if n.maximum is None:
            continue
        with pytest.raises(ValidationError) as info:
            model.model_validate(_set(base, n.path, over(n)))
        errors = info.value.errors()
        assert _loc(errors[0]).startswith(n.path.replace("[]", "[0]")), (n, errors)
        checked += 1
    assert checked >= 5
