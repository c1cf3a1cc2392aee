"""Effort scores on a tiny random Llama built in the test: the batched, prefix-cached computation
must equal the reference procedure (batch 1, full backward through every LoRA weight)."""

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from tiny_llm import randomise_lora_b, tiny_dataset, tiny_llama, tiny_tokenizer

from core.config import EffortConfig
from core.effort.llm import attach_lora
from core.effort.prompts import PromptTemplate, make_record, tokenize_samples
from core.effort.score import EffortScorer, EffortSettings, effort_reference, find_target


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = attach_lora(tiny_llama(len(tok)), EffortConfig(seed=3))
    randomise_lora_b(model)
    ds = tiny_dataset()
    samples = tokenize_samples(ds, list(range(ds.n_users)), tok, cutoff_len=128)
    target = find_target(model)
    ref = np.array([effort_reference(model, target, s, torch.device("cpu")) for s in samples])
    return tok, model, ds, samples, ref


@pytest.mark.parametrize("cache_prefix", [False, True])
@pytest.mark.parametrize("max_batch_tokens", [1, 80, 100_000])
def test_batched_effort_equals_reference(setup, cache_prefix, max_batch_tokens):
    tok, model, _, samples, ref = setup
    scorer = EffortScorer(model, find_target(model), EffortSettings(cache_prefix=cache_prefix,
                          max_batch_tokens=max_batch_tokens, logits_chunk=7), torch.device("cpu"), tok.eos_token_id)
    got = scorer.score(samples)
    assert np.all(ref > 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_batched_equals_batch_size_one(setup):
    tok, model, _, samples, _ = setup
    target = find_target(model)
    one = EffortScorer(model, target, EffortSettings(max_batch_tokens=1), torch.device("cpu"), tok.eos_token_id)
    many = EffortScorer(model, target, EffortSettings(max_batch_tokens=10_000), torch.device("cpu"), tok.eos_token_id)
    np.testing.assert_allclose(many.score(samples), one.score(samples), rtol=1e-4)


def test_bf16_keeps_the_ranking(setup):
    tok, model, _, samples, ref = setup
    model = copy.deepcopy(model)
    scorer = EffortScorer(model, find_target(model), EffortSettings(precision="bf16", max_batch_tokens=80),
                          torch.device("cpu"), tok.eos_token_id)
    got = scorer.score(samples)
    assert spearmanr(got, ref).statistic > 0.99
    np.testing.assert_allclose(got, ref, rtol=5e-2)


def test_fresh_lora_is_seeded():
    tok = tiny_tokenizer()
    a = attach_lora(tiny_llama(len(tok)), EffortConfig(seed=5))
    b = attach_lora(tiny_llama(len(tok)), EffortConfig(seed=5))
    c = attach_lora(tiny_llama(len(tok)), EffortConfig(seed=6))
    wa, wb, wc = (find_target(m).lora_A.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_progress_and_cancel(setup):
    from core.effort.score import EffortCancelled

    tok, model, _, samples, _ = setup
    scorer = EffortScorer(model, find_target(model), EffortSettings(max_batch_tokens=1), torch.device("cpu"),
                          tok.eos_token_id)
    seen = []
    scorer.score(samples[:3], progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(EffortCancelled):
        scorer.score(samples, cancel=lambda: True)


def test_prompt_wording_and_truncation():
    tok = tiny_tokenizer()
    ds = tiny_dataset()
    user = max(range(ds.n_users), key=lambda u: len(ds.history(u)))
    rec = make_record(ds, user, PromptTemplate())
    assert rec.input.startswith("The user has purchased the following game products before, with titles as: ")
    assert rec.prompt().startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nGiven the game products" in rec.prompt()
    assert rec.prompt().endswith(f"### Response:\n{ds.item_titles[ds.target(user) - 1]}")
    full = tokenize_samples(ds, [user], tok, cutoff_len=10_000)[0]
    assert full.kept == len(ds.history(user)) and full.ids[-1] == tok.eos_token_id
    limit = len(full.ids) - 3
    cut = tokenize_samples(ds, [user], tok, cutoff_len=limit)[0]
    assert len(cut.ids) <= limit and cut.ids[-1] == tok.eos_token_id
    assert 0 <= cut.kept < full.kept
    # The oldest items are dropped: what is kept is the most recent part of the history.
    kept_rec = make_record(ds, user, PromptTemplate(), cut.kept)
    recent = ds.history(user)[len(ds.history(user)) - cut.kept:]
    assert kept_rec.input.endswith("; ".join(ds.item_titles[i - 1] for i in recent)) or cut.kept == 0
    # One more item would not fit.
    longer = tok(make_record(ds, user, PromptTemplate(), cut.kept + 1).prompt())["input_ids"]
    assert len(longer) + 1 > limit


def test_find_target_rejects_unknown_module(setup):
    _, model, _, _, _ = setup
    with pytest.raises(ValueError, match="no LoRA-wrapped module"):
        find_target(model, target_module="k_proj")


def test_processes_give_the_same_scores(setup, tmp_path):
    """Several CPU processes, each loading the model from a folder as the pipeline does, give the
    scores of one process."""
    from core.effort.parallel import score_in_processes

    tok, _, ds, samples, _ = setup
    folder = tmp_path / "tiny-llama"
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = EffortConfig(llm=str(folder), seed=3)
    from core.effort.llm import attach_lora as attach
    from core.effort.llm import load_base_model, resolve_llm

    model, _ = load_base_model(resolve_llm(cfg.llm), tmp_path / "cache")
    model = attach(model, cfg)
    settings = EffortSettings(max_batch_tokens=200)
    one = EffortScorer(model, find_target(model), settings, torch.device("cpu"), tok.eos_token_id).score(samples)
    seen = []
    many = score_in_processes(cfg, tmp_path / "cache", settings, samples, tok.eos_token_id, processes=2, threads=1,
                              progress=lambda f, m: seen.append(f))
    np.testing.assert_allclose(many, one, rtol=1e-5)
    assert seen and seen[-1] == 1.0


def test_start_from_a_given_adapter(tmp_path):
    """`adapter` loads a peft adapter folder: its weights, not a fresh random LoRA, define the scores."""
    tok = tiny_tokenizer()
    trained = attach_lora(tiny_llama(len(tok)), EffortConfig(seed=1))
    randomise_lora_b(trained)
    trained.save_pretrained(tmp_path / "adapter")
    loaded = attach_lora(tiny_llama(len(tok)), EffortConfig(adapter=str(tmp_path / "adapter"), seed=99))
    assert torch.equal(find_target(loaded).lora_B.weight, find_target(trained).lora_B.weight)
    assert torch.equal(find_target(loaded).lora_A.weight, find_target(trained).lora_A.weight)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_response_loss_effort_equals_the_reference_on_the_answer_tokens(setup):
    """loss="response": the norm of the gradient of the mean loss over the response tokens (the target
    title and EOS) alone, as a full backward with the prompt's labels masked computes it."""
    tok, model, ds, samples, prompt_ref = setup
    target = find_target(model)
    ref = np.array([effort_reference(model, target, s, torch.device("cpu"), loss="response") for s in samples])
    for s in samples:
        rec = make_record(ds, s.user, PromptTemplate(), s.kept)
        head = tok(rec.prompt()[:len(rec.prompt()) - len(rec.output)])["input_ids"]
        assert s.response_from == len(head) and s.ids[:s.response_from] == tuple(head)
        assert s.ids[-1] == tok.eos_token_id and len(s.ids) - s.response_from >= 2  # a title and EOS
    for cache_prefix, tokens in ((False, 1), (True, 80), (True, 100_000)):
        scorer = EffortScorer(model, target, EffortSettings(cache_prefix=cache_prefix, max_batch_tokens=tokens,
                                                            logits_chunk=5, loss="response"),
                              torch.device("cpu"), tok.eos_token_id)
        np.testing.assert_allclose(scorer.score(samples), ref, rtol=1e-4)
    assert not np.allclose(ref, prompt_ref, rtol=0.05)


def test_response_loss_by_hand(setup):
    """The response effort of one sample from its definition: the mean cross-entropy of the response
    tokens, differentiated w.r.t. lora_B with torch.autograd on the plain model."""
    tok, model, _, samples, _ = setup
    s = max(samples, key=lambda x: len(x.ids))
    target = find_target(model)
    ids = torch.tensor([s.ids])
    B = target.lora_B.weight
    B.requires_grad_(True)
    try:
        logits = model(input_ids=ids).logits[0]
        pred, gold = logits[s.response_from - 1:-1], ids[0, s.response_from:]
        loss = torch.nn.functional.cross_entropy(pred, gold)
        (grad,) = torch.autograd.grad(loss, [B])
    finally:
        B.requires_grad_(False)
    scorer = EffortScorer(model, target, EffortSettings(loss="response"), torch.device("cpu"), tok.eos_token_id)
    assert scorer.score([s])[0] == pytest.approx(float(grad.norm()), rel=1e-4)


def test_caching_the_dequantised_llm_twice_leaves_no_temporary_copy(tmp_path):
    """Two processes that load the GGUF at once both save; the second rename fails on the first's
    folder, and its temporary copy (hundreds of MB for a real model) must not stay behind."""
    from core.effort.llm import _save_atomically

    tok = tiny_tokenizer()
    target = tmp_path / "llm" / "key"
    target.parent.mkdir()
    for _ in range(2):
        _save_atomically(tiny_llama(len(tok)), tok, target)
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["key"]


def test_transformers_gguf_bar_is_silenced_while_loading_and_restored_after():
    """De-quantising a GGUF file draws transformers' own tqdm bar, which its progress switch does not
    reach: it is disabled while load_base_model loads, and transformers is left as it was."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from core.effort.llm import _no_gguf_bar

    original = gguf_utils.tqdm
    with _no_gguf_bar():
        assert gguf_utils.tqdm([1, 2], desc="Converting and de-quantizing GGUF tensors...").disable
    assert gguf_utils.tqdm is original and not original([1, 2], disable=False).disable
