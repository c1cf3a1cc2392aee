"""Batched, prefix-shared generation and the teacher-forced answer NLL equal the plain one-by-one
computations on a tiny random Llama (with a LoRA adapter whose B is non-zero, as after training)."""

import pytest
import torch
from tiny_llm import NUMBER_WORDS, randomise_lora_b, tiny_dataset, tiny_llama, tiny_tokenizer

from core.effort.prompts import PromptTemplate, tokenize_samples
from core.evaluate.bigrec import answer_tokens, select_test_users
from core.evaluate.generate import generate_batched, shared_prefix_length


@pytest.fixture(scope="module")
def setup():
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer(NUMBER_WORDS)
    model = tiny_llama(len(tok), seed=3)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    randomise_lora_b(model, 0.2)
    model.eval()
    ds = tiny_dataset(30, seed=2, with_eval=True)
    users = select_test_users(ds)
    samples = tokenize_samples(ds, users, tok, 512, PromptTemplate(), split="test")
    return tok, model, ds, samples, [s.ids for s in samples]


def _one_by_one(model, tok, prompt, num_beams, max_new_tokens):
    from transformers import GenerationConfig

    gen = GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        seq = model.generate(input_ids=torch.tensor([list(prompt)]), generation_config=gen)
    return tok.decode(seq[0, len(prompt):], skip_special_tokens=True).strip('"')


def _nll_reference(model, prompt, answer):
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    pred = logits[len(prompt) - 1:len(prompt) + len(answer) - 1]
    return float(torch.nn.functional.cross_entropy(pred, torch.tensor(list(answer))))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_by_one(setup, num_beams):
    tok, model, _, _, prompts = setup
    assert shared_prefix_length(prompts) > 10  # the Alpaca header and instruction are shared
    want = [_one_by_one(model, tok, p, num_beams, 8) for p in prompts]
    for batch_size, share in ((1, False), (4, True), (7, False), (len(prompts), True)):
        got = generate_batched(model, tok, prompts, num_beams=num_beams, max_new_tokens=8, batch_size=batch_size,
                               share_prefix=share)
        assert got.texts == want, (batch_size, share)
        assert got.new_tokens > 0


def test_answer_nll_equals_a_full_forward_pass_and_leaves_generation_unchanged(setup):
    tok, model, ds, samples, prompts = setup
    answers = answer_tokens(ds, samples, tok, PromptTemplate())
    assert all(a and a[-1] == tok.eos_token_id for a in answers)
    plain = generate_batched(model, tok, prompts, num_beams=2, max_new_tokens=6, batch_size=5)
    both = generate_batched(model, tok, prompts, answers, num_beams=2, max_new_tokens=6, batch_size=5)
    assert both.texts == plain.texts
    assert both.answer_tokens == [len(a) for a in answers]
    for p, a, got in zip(prompts, answers, both.nll):
        assert got == pytest.approx(_nll_reference(model, p, a), rel=1e-5, abs=1e-6)
    only = generate_batched(model, tok, prompts, answers, batch_size=3, generate=False, share_prefix=False)
    assert only.texts == [""] * len(prompts) and only.new_tokens == 0
    assert only.nll == pytest.approx(both.nll, rel=1e-5, abs=1e-6)


def test_answer_tokens_are_what_training_appends_to_the_prompt(setup):
    tok, _, ds, samples, prompts = setup
    from core.effort.prompts import clean_title, format_prompt, make_record

    answers = answer_tokens(ds, samples, tok, PromptTemplate())
    for u, p, a in zip([s.user for s in samples], prompts, answers):
        rec = make_record(ds, u, PromptTemplate(), split="test")
        title = clean_title(ds.item_titles[ds.test[u][0] - 1])
        full = tok(format_prompt(rec.instruction, rec.input, title))["input_ids"] + [tok.eos_token_id]
        assert list(p) + list(a) == full
