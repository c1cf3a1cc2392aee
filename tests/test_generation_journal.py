"""An interrupted evaluation resumes from its journal of finished generation batches and gives the
results of an uninterrupted one; a journal of another evaluation, or a line cut short by a crash,
is never trusted."""

import json

import pytest
import torch
from tiny_llm import NUMBER_WORDS, tiny_dataset, tiny_llama, tiny_tokenizer

from core.config import LLMEvalConfig
from core.effort.prompts import PromptTemplate, tokenize_samples
from core.evaluate.bigrec import EvaluationCancelled, answer_tokens, evaluate_llm, select_test_users
from core.evaluate.generate import generate_batched
from core.evaluate.journal import GenerationJournal
from core.surrogate.train import Cancelled


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer(NUMBER_WORDS)
    model = tiny_llama(len(tok), seed=5).eval()
    ds = tiny_dataset(24, seed=4, with_eval=True)
    samples = tokenize_samples(ds, select_test_users(ds), tok, 512, PromptTemplate(), split="test")
    return tok, model, ds, [s.ids for s in samples], answer_tokens(ds, samples, tok, PromptTemplate())


def _stop_after(batches: int):
    """A cancel callback that lets `batches` batches run, then stops the pass."""
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > batches
    return cancel


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_interrupted_pass_resumes_from_its_journal_with_the_uninterrupted_results(setup, tmp_path):
    tok, model, _, prompts, answers = setup
    kw = {"num_beams": 2, "max_new_tokens": 5, "batch_size": 4}
    want = generate_batched(model, tok, prompts, answers, **kw)
    path = tmp_path / "cell.partial.jsonl"

    with pytest.raises(Cancelled):
        generate_batched(model, tok, prompts, answers, **kw, journal=GenerationJournal(path, "k1"),
                         cancel=_stop_after(2))
    header, *batches = _lines(path)
    assert header["key"] == "k1" and len(batches) == 2 and all(len(b["rows"]) == 4 for b in batches)

    # The journaled batches are read, not run again: a row altered in the file comes back altered.
    batches[0]["rows"][0]["text"] = "FROM THE JOURNAL"
    path.write_text("\n".join(json.dumps(x) for x in [header, *batches]) + "\n")
    marked = batches[0]["rows"][0]["i"]
    journal = GenerationJournal(path, "k1")
    assert len(journal.rows) == 8
    got = generate_batched(model, tok, prompts, answers, **kw, journal=journal)
    assert got.texts[marked] == "FROM THE JOURNAL"
    got.texts[marked] = want.texts[marked]
    assert got.texts == want.texts and got.new_tokens == want.new_tokens
    assert got.nll == pytest.approx(want.nll, rel=1e-6) and got.answer_tokens == want.answer_tokens
    assert len(_lines(path)) == 1 + -(-len(prompts) // 4)  # every batch recorded once


def test_a_journal_of_another_evaluation_or_a_torn_line_is_not_trusted(setup, tmp_path):
    tok, model, _, prompts, answers = setup
    kw = {"num_beams": 1, "max_new_tokens": 4, "batch_size": 5}
    path = tmp_path / "j.partial.jsonl"
    with pytest.raises(Cancelled):
        generate_batched(model, tok, prompts, answers, **kw, journal=GenerationJournal(path, "a"),
                         cancel=_stop_after(2))
    # A crash in the middle of the second batch's line: that batch is dropped and runs again.
    text = path.read_text()
    path.write_text(text[:len(text) - 20])
    journal = GenerationJournal(path, "a")
    assert len(journal.rows) == 5 and path.read_text().endswith("\n")
    want = generate_batched(model, tok, prompts, answers, **kw)
    assert generate_batched(model, tok, prompts, answers, **kw, journal=journal).texts == want.texts
    assert all(isinstance(x, dict) for x in _lines(path))

    # A batch recorded twice (two runs at once) counts once.
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    twice = GenerationJournal(path, "a")
    assert twice.seconds == pytest.approx(sum(json.loads(x)["seconds"] for x in lines[1:]))

    # Another key (other prompts, settings or weights): nothing is reused, and the file stays as it is
    # until the new evaluation records its first batch, which replaces it.
    before = path.read_text()
    other = GenerationJournal(path, "b")
    assert other.rows == {} and path.read_text() == before
    with pytest.raises(Cancelled):
        generate_batched(model, tok, prompts, answers, **kw, journal=other, cancel=_stop_after(1))
    assert [x.get("key") for x in _lines(path)][:1] == ["b"] and len(_lines(path)) == 2


def test_evaluate_llm_keys_its_journal_to_the_model_identity(setup, tmp_path):
    tok, model, ds, _, _ = setup
    cfg = LLMEvalConfig(num_beams=2, max_new_tokens=4, test_users=10, batch_size=3)
    items = torch.zeros((ds.n_items, model.config.hidden_size))
    path = tmp_path / "eval.partial.jsonl"
    calls = {"n": 0}

    def cancel_in_generation() -> bool:  # the evaluation checks `cancel` once per batch while generating
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(EvaluationCancelled):
        evaluate_llm(model, tok, ds, cfg, items=items, journal=path, identity={"adapter": "w1"},
                     cancel=cancel_in_generation)
    assert len(_lines(path)) >= 2
    full = evaluate_llm(model, tok, ds, cfg, items=items)
    resumed = evaluate_llm(model, tok, ds, cfg, items=items, journal=path, identity={"adapter": "w1"})
    assert resumed["predictions"] == full["predictions"] and resumed["metrics"] == full["metrics"]
    key = _lines(path)[0]["key"]
    # The generation time of the earlier, interrupted run counts in the resumed run's.
    assert resumed["seconds"]["generate"] >= sum(b["seconds"] for b in _lines(path)[1:3])
    # Other weights (or other settings) make another key: nothing of the old journal is reused.
    evaluate_llm(model, tok, ds, cfg, items=items, journal=path, identity={"adapter": "w2"})
    other_weights = _lines(path)[0]["key"]
    evaluate_llm(model, tok, ds, cfg.model_copy(update={"max_new_tokens": 3}), items=items, journal=path,
                 identity={"adapter": "w2"})
    assert len({key, other_weights, _lines(path)[0]["key"]}) == 3


def test_a_journal_is_keyed_to_the_weights_not_to_where_they_lie(setup, tmp_path):
    """Carried to another folder (another session's checkout, another machine), a journal still
    resumes: its key holds the weights' content and the settings, not the adapter's or LLM's path."""
    import shutil

    tok, model, ds, _, _ = setup
    cfg = LLMEvalConfig(num_beams=1, max_new_tokens=3, test_users=8, batch_size=2)
    items = torch.zeros((ds.n_items, model.config.hidden_size))
    here = tmp_path / "a" / "cell.partial.jsonl"
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(EvaluationCancelled):
        evaluate_llm(model, tok, ds, cfg.model_copy(update={"adapter": "/old/place"}), items=items, journal=here,
                     cancel=stop)
    there = tmp_path / "b" / "cell.partial.jsonl"
    there.parent.mkdir()
    shutil.copy(here, there)
    assert len(GenerationJournal(there, _lines(there)[0]["key"]).rows) == 2
    moved = cfg.model_copy(update={"adapter": "/new/place", "llm": "/elsewhere/model"})
    resumed = evaluate_llm(model, tok, ds, moved, items=items, journal=there)
    assert _lines(there)[1] == _lines(here)[1]  # the carried batch was kept, not replaced
    assert resumed["predictions"] == evaluate_llm(model, tok, ds, cfg, items=items)["predictions"]
    # Other weights are another key.
    from core.evaluate.journal import weights_fingerprint

    other = tiny_llama(len(tok), seed=6).eval()
    assert weights_fingerprint(other) != weights_fingerprint(model)
