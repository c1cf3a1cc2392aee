"""LoRA fine-tuning on a tiny random Llama: the loss goes down, the adapter loads back, the result does
not depend on the micro-batch size, runs are reproducible, early stopping keeps the best epoch."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from tiny_llm import NUMBER_WORDS, tiny_dataset, tiny_llama, tiny_tokenizer

from core.config import FinetuneConfig
from core.effort.prompts import PromptTemplate, format_prompt, make_record
from core.finetune import (
    EncodedSample,
    FinetuneCancelled,
    FinetuneError,
    attach_trainable_lora,
    collate,
    encode_records,
    encode_users,
    epoch_batches,
    lr_multiplier,
    mean_loss,
    read_meta,
    save_adapter,
    selection_fingerprint,
    train_lora,
    trainable_state,
)
from core.surrogate.train import Cancelled

FAST = dict(batch_size=8, micro_batch_size=3, lr=5e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def data():
    tok = tiny_tokenizer(NUMBER_WORDS)
    ds = tiny_dataset(20, with_eval=True)
    users = list(range(ds.n_users))
    train = encode_users(ds, users, tok, 128)
    valid = encode_users(ds, users, tok, 128, split="valid")
    return tok, ds, train, valid


def fresh(tok, cfg):
    return attach_trainable_lora(tiny_llama(len(tok)), cfg)


def test_training_lowers_the_loss_and_the_adapter_loads_back(data, tmp_path):
    tok, _, train, valid = data
    cfg = FinetuneConfig(epochs=4, **FAST)
    model = fresh(tok, cfg)
    before = mean_loss(model, train, tok.eos_token_id)
    seen = []
    result = train_lora(model, train, valid, cfg, pad_id=tok.eos_token_id, progress=lambda f, m: seen.append(f))
    after = mean_loss(model, train, tok.eos_token_id)
    assert after < before - 0.05
    assert result.steps == 4 * 3 and result.epochs_run == 4 and 1 <= result.best_epoch <= 4
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and all("valid_loss" in h for h in result.history)
    assert seen == sorted(seen) and seen[-1] == 1.0

    save_adapter(model, tmp_path / "adapter", {"note": "test"})
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert read_meta(tmp_path / "adapter") == {"note": "test"}
    loaded = PeftModel.from_pretrained(tiny_llama(len(tok)), str(tmp_path / "adapter"))
    ids, mask, _ = collate(train[:3], tok.eos_token_id)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(input_ids=ids, attention_mask=mask).logits.numpy(),
                                   model(input_ids=ids, attention_mask=mask).logits.numpy(), atol=1e-5)
        base = tiny_llama(len(tok))(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base, loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


def test_micro_batch_size_does_not_change_the_result(data):
    """The loss of a step is the token mean over the effective batch, so accumulation is exact."""
    tok, _, train, valid = data
    states = []
    for micro in (1, 3, 8):
        cfg = FinetuneConfig(epochs=2, lora_dropout=0.0, **{**FAST, "micro_batch_size": micro})
        model = fresh(tok, cfg)
        train_lora(model, train, valid, cfg, pad_id=tok.eos_token_id)
        states.append(trainable_state(model))
    for other in states[1:]:
        for name, value in states[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-6)


def test_runs_are_reproducible_and_seeded(data):
    tok, _, train, valid = data
    runs = []
    for seed in (0, 0, 1):
        cfg = FinetuneConfig(epochs=2, seed=seed, **FAST)
        model = fresh(tok, cfg)
        train_lora(model, train, valid, cfg, pad_id=tok.eos_token_id)
        runs.append(trainable_state(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_early_stopping_restores_the_best_epoch(data):
    tok, _, train, _ = data
    # Training teaches one word after every sample; validation scores another word in that place, so
    # its loss rises once training takes hold (a construction that does not hinge on the optimizer).
    eos, taught, other = tok.eos_token_id, tok.convert_tokens_to_ids("kirby"), tok.convert_tokens_to_ids("halo")
    valid = [EncodedSample(s.ids[:-1] + (other, eos), len(s.ids) - 1) for s in train]
    train = [EncodedSample(s.ids[:-1] + (taught, eos)) for s in train]
    cfg = FinetuneConfig(epochs=12, patience=2, **{**FAST, "lr": 2e-2})
    model = fresh(tok, cfg)
    result = train_lora(model, train, valid, cfg, pad_id=tok.eos_token_id)
    losses = [h["valid_loss"] for h in result.history]
    assert result.stopped_early and result.epochs_run < 12
    assert result.best_epoch == 1 + int(np.argmin(losses))
    assert mean_loss(model, valid, tok.eos_token_id, micro_batch_size=3) == pytest.approx(min(losses), rel=1e-5)


def test_without_validation_samples_every_epoch_runs(data):
    tok, _, train, _ = data
    cfg = FinetuneConfig(epochs=2, patience=1, **FAST)
    result = train_lora(fresh(tok, cfg), train, [], cfg, pad_id=tok.eos_token_id)
    assert result.epochs_run == 2 and result.best_epoch == 0 and not result.stopped_early


def test_cancel(data):
    tok, _, train, valid = data
    cfg = FinetuneConfig(epochs=2, **FAST)
    with pytest.raises(FinetuneCancelled):
        train_lora(fresh(tok, cfg), train, valid, cfg, pad_id=tok.eos_token_id, cancel=lambda: True)
    assert issubclass(FinetuneCancelled, Cancelled)


def test_samples_are_the_bigrec_records(data):
    """Training samples are exactly the bigrec_train.jsonl records (history minus the last item ->
    the last item) + EOS; validation samples use the whole training line -> the validation item."""
    tok, ds, train, valid = data
    template = PromptTemplate()
    for u, s in enumerate(train):
        rec = make_record(ds, u, template)
        assert s.ids == tuple(tok(rec.prompt())["input_ids"]) + (tok.eos_token_id,) and s.loss_from == 0
    with_valid = [u for u in range(ds.n_users) if ds.valid[u]]
    assert len(valid) == len(with_valid) < ds.n_users
    u = with_valid[0]
    rec = make_record(ds, u, template, split="valid")
    assert rec.output == ds.item_titles[ds.valid[u][0] - 1]
    assert rec.input.endswith("; ".join(ds.item_titles[i - 1] for i in ds.train[u]))
    assert valid[0].ids == tuple(tok(rec.prompt())["input_ids"]) + (tok.eos_token_id,)
    # The same samples from the records as written to bigrec_train.jsonl.
    records = [make_record(ds, u, template).to_json() for u in range(ds.n_users)]
    assert encode_records(records, tok, 128) == train


def test_cutoff_and_train_on_inputs(data):
    tok, ds, _, _ = data
    long_user = max(range(ds.n_users), key=lambda u: len(ds.train[u]))
    full = encode_users(ds, [long_user], tok, 10_000)[0]
    cut = encode_users(ds, [long_user], tok, len(full.ids) - 3)[0]
    assert len(cut.ids) <= len(full.ids) - 3 and cut.ids[-1] == tok.eos_token_id
    masked = encode_users(ds, [long_user], tok, 10_000, train_on_inputs=False)[0]
    rec = make_record(ds, long_user, PromptTemplate())
    prefix = len(tok(format_prompt(rec.instruction, rec.input, ""))["input_ids"])
    assert masked.ids == full.ids and masked.loss_from == prefix
    _, _, labels = collate([masked], pad_id=0)
    assert (labels[0, :prefix] == -100).all() and (labels[0, prefix:] >= 0).all()
    assert masked.n_loss_tokens() == len(full.ids) - prefix
    with pytest.raises(FinetuneError):
        encode_records([{"instruction": "x"}], tok, 64)


def test_collate_pads_on_the_right():
    ids, mask, labels = collate([EncodedSample((5, 6, 7)), EncodedSample((8,), 0)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[5, 6, 7], [8, -100, -100]]


def test_schedule():
    # Warmup 2 of 6 steps, then linear decay that ends above zero.
    got = [lr_multiplier(s, 6, 2) for s in range(1, 7)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [lr_multiplier(s, 4, 0) for s in range(1, 5)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [lr_multiplier(s, 5, 2, "constant") for s in range(1, 6)] == pytest.approx([0.5, 1, 1, 1, 1])
    with pytest.raises(ValueError):
        lr_multiplier(0, 5, 2)


def test_epoch_batches_cover_every_sample_once():
    lengths = [5, 9, 1, 7, 3, 8, 2, 6, 4, 10, 11]
    steps = epoch_batches(lengths, batch_size=4, micro_batch_size=3, rng=np.random.default_rng(0))
    assert [sum(len(m) for m in s) for s in steps] == [4, 4, 3]
    flat = [i for s in steps for m in s for i in m]
    assert sorted(flat) == list(range(len(lengths)))
    for s in steps:
        inside = [lengths[i] for m in s for i in m]
        assert inside == sorted(inside, reverse=True)


def test_selection_fingerprint_is_a_set_identity():
    a = selection_fingerprint("fp", ["u1", "u2", "u3"])
    assert a == selection_fingerprint("fp", ["u3", "u1", "u2"])
    assert a != selection_fingerprint("fp", ["u1", "u2"]) and a != selection_fingerprint("other", ["u1", "u2", "u3"])


def test_config_defaults_and_validation():
    cfg = FinetuneConfig()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert cfg.lora_target_modules == ("q_proj", "v_proj")
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.cutoff_len, cfg.train_on_inputs) == (128, 1e-4, 50, 512, True)
    assert (cfg.warmup_steps, cfg.patience, cfg.max_grad_norm, cfg.weight_decay) == (20, 5, 1.0, 0.0)
    with pytest.raises(ValueError):
        FinetuneConfig(batch_size=4, micro_batch_size=8)


def test_save_adapter_is_atomic_and_guards_foreign_folders(data, tmp_path):
    tok, _, _, _ = data
    model = fresh(tok, FinetuneConfig())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not empty"):
        save_adapter(model, tmp_path / "busy", {})
    save_adapter(model, tmp_path / "a", {"run": 1})
    save_adapter(model, tmp_path / "a", {"run": 2})  # an earlier adapter is replaced
    assert json.loads((tmp_path / "a" / "finetune.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "busy"]  # no temporary folder left


def test_token_budget_micro_batches_pad_less_and_train_the_same(data):
    """micro_batch_tokens: the same effective batches cut by a token budget instead of a count; the
    update of every step is the same (up to float rounding; without dropout, whose random masks are
    drawn per micro-batch), padding shrinks."""
    tok, _, train, valid = data
    lengths = [len(s.ids) for s in train]
    fixed = epoch_batches(lengths, 8, 3, np.random.default_rng(0))
    budget = epoch_batches(lengths, 8, 3, np.random.default_rng(0), micro_batch_tokens=2 * max(lengths))
    assert [sorted(i for m in b for i in m) for b in fixed] == [sorted(i for m in b for i in m) for b in budget]
    for batch in budget:
        for micro in batch:
            assert len(micro) == 1 or len(micro) * lengths[micro[0]] <= 2 * max(lengths)
            assert lengths[micro[0]] == max(lengths[i] for i in micro)

    def padding(batches):
        return sum(len(m) * max(lengths[i] for i in m) - sum(lengths[i] for i in m) for b in batches for m in b)

    assert padding(epoch_batches(lengths, 8, 1, np.random.default_rng(0), micro_batch_tokens=1)) == 0
    states = []
    for extra in ({}, {"micro_batch_tokens": 2 * max(lengths)}):
        cfg = FinetuneConfig(epochs=2, lora_dropout=0.0, **FAST, **extra)
        model = fresh(tok, cfg)
        train_lora(model, train, valid, cfg, pad_id=tok.eos_token_id)
        states.append(trainable_state(model))
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-4, atol=1e-6)


def _cancel_after(calls: int):
    seen = [0]

    def cancel() -> bool:
        seen[0] += 1
        return seen[0] > calls

    return cancel


@pytest.mark.parametrize("calls", [4, 9, 14])  # mid-epoch 1, just past epoch 1's end, mid-epoch 2
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(data, tmp_path, calls):
    """Dropout on, so torch's RNG must be restored too; the checkpoint is written after every batch."""
    tok, _, train, valid = data
    cfg = FinetuneConfig(epochs=3, **FAST)
    whole = fresh(tok, cfg)
    expected = train_lora(whole, train, valid, cfg, pad_id=tok.eos_token_id)
    ckpt = tmp_path / "run.resume.pt"
    with pytest.raises(FinetuneCancelled):
        train_lora(fresh(tok, cfg), train, valid, cfg, pad_id=tok.eos_token_id, cancel=_cancel_after(calls),
                   checkpoint=ckpt, checkpoint_every_s=0)
    assert ckpt.is_file()
    resumed_model = fresh(tok, cfg)
    resumed = train_lora(resumed_model, train, valid, cfg, pad_id=tok.eos_token_id, checkpoint=ckpt,
                         checkpoint_every_s=0)
    assert not ckpt.exists()  # removed once training ends
    assert (resumed.steps, resumed.epochs_run, resumed.best_epoch) == (expected.steps, expected.epochs_run,
                                                                      expected.best_epoch)
    assert resumed.history == expected.history
    final, reference = trainable_state(resumed_model), trainable_state(whole)
    assert all(torch.equal(final[n], reference[n]) for n in reference)


def test_a_checkpoint_of_another_run_or_a_torn_file_is_not_resumed(data, tmp_path):
    tok, _, train, valid = data
    ckpt = tmp_path / "run.resume.pt"
    cfg0, cfg1 = FinetuneConfig(epochs=2, seed=0, **FAST), FinetuneConfig(epochs=2, seed=1, **FAST)
    with pytest.raises(FinetuneCancelled):
        train_lora(fresh(tok, cfg0), train, valid, cfg0, pad_id=tok.eos_token_id, cancel=_cancel_after(5),
                   checkpoint=ckpt, checkpoint_every_s=0)
    reference = fresh(tok, cfg1)
    train_lora(reference, train, valid, cfg1, pad_id=tok.eos_token_id)
    for content in (None, b"not a checkpoint"):
        if content is not None:
            ckpt.write_bytes(content)
        model = fresh(tok, cfg1)
        train_lora(model, train, valid, cfg1, pad_id=tok.eos_token_id, checkpoint=ckpt)
        got, want = trainable_state(model), trainable_state(reference)
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert not ckpt.exists()


def test_a_checkpoint_resumes_only_onto_the_base_weights_it_was_trained_on(data, tmp_path):
    """The recipe names the LLM by its path: other weights there must not pick up the run. A checkpoint
    from before the base digest was recorded (none in it) still resumes on its fingerprint."""
    tok, _, train, valid = data
    cfg = FinetuneConfig(epochs=2, **FAST)
    ckpt = tmp_path / "run.resume.pt"

    def other_base():
        model = fresh(tok, cfg)
        with torch.no_grad():
            next(p for p in model.parameters() if not p.requires_grad).add_(0.5)
        return model

    def interrupted():
        with pytest.raises(FinetuneCancelled):
            train_lora(fresh(tok, cfg), train, valid, cfg, pad_id=tok.eos_token_id, cancel=_cancel_after(5),
                       checkpoint=ckpt, checkpoint_every_s=0)

    interrupted()
    reference = other_base()
    train_lora(reference, train, valid, cfg, pad_id=tok.eos_token_id)
    model = other_base()
    train_lora(model, train, valid, cfg, pad_id=tok.eos_token_id, checkpoint=ckpt)
    got, want = trainable_state(model), trainable_state(reference)
    assert all(torch.equal(got[n], want[n]) for n in want)  # trained from scratch, not from the checkpoint

    interrupted()
    blob = torch.load(ckpt, weights_only=True)
    assert blob["base"]
    blob.pop("base")  # as written before the digest existed
    torch.save(blob, ckpt)
    whole = fresh(tok, cfg)
    train_lora(whole, train, valid, cfg, pad_id=tok.eos_token_id)
    resumed = fresh(tok, cfg)
    train_lora(resumed, train, valid, cfg, pad_id=tok.eos_token_id, checkpoint=ckpt, checkpoint_every_s=0)
    got, want = trainable_state(resumed), trainable_state(whole)
    assert all(torch.equal(got[n], want[n]) for n in want)
