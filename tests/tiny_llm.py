"""A tiny random Llama and a word-level tokenizer for fast CPU tests of the LLM code paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.data.dataset import RecDataset

WORDS = (
    'below', 'is', 'an', 'instruction', 'that', 'describes', 'a', 'task', 'paired', 'with', 'input', 'provides',
    'further', 'context', 'write', 'response', 'appropriately', 'completes', 'the', 'request', '#',
    'instruction', 'input', 'response', 'given', 'game', 'products', 'user', 'purchased', 'before', 'please',
    'recommend', 'new', 'product', 'likes', 'to', 'has', 'following', 'with', 'titles', 'as', 'a', ';', '.',
    ',', ':', '-', 'zelda', 'mario', 'halo', 'doom', 'sonic', 'tetris', 'pacman', 'metroid', 'kirby', 'fifa')
# Enough to tell the titles of core.data.synthetic ("Game number 17") apart.
NUMBER_WORDS = ["number"] + [str(i) for i in range(100)]


def tiny_tokenizer(extra_words: tuple[str, ...] | list[str] = ()) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in (*WORDS, *extra_words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_model_folder(folder: Path, extra_words: tuple[str, ...] | list[str] = tuple(NUMBER_WORDS),
                      seed: int = 0) -> Path:
    """A local Hugging Face model folder (config, weights, tokenizer) that `--llm PATH` loads."""
    tok = tiny_tokenizer(extra_words)
    tiny_llama(len(tok), seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def tiny_dataset(n_users: int = 14, seed: int = 0, with_eval: bool = False) -> RecDataset:
    """Users with 1-11 training items over 8 titles; with `with_eval`, most users also get one
    validation and one test item (a few get none, as real data has)."""
    rng = np.random.default_rng(seed)
    titles = ("zelda", "mario halo", "doom - sonic", "tetris", "pacman metroid", "kirby", "fifa zelda", "halo doom")
    train = tuple(tuple(int(x) for x in rng.integers(1, len(titles) + 1, size=rng.integers(1, 12)))
                  for _ in range(n_users))
    empty = tuple(() for _ in range(n_users))
    valid = test = empty
    if with_eval:
        valid = tuple(() if u % 5 == 4 else (int(rng.integers(1, len(titles) + 1)),) for u in range(n_users))
        test = tuple(() if u % 7 == 6 else (int(rng.integers(1, len(titles) + 1)),) for u in range(n_users))
    return RecDataset(user_ids=tuple(f"u{i}" for i in range(n_users)),
                      item_ids=tuple(f"i{i}" for i in range(len(titles))),
                      item_titles=titles, train=train, valid=valid, test=test)


def randomise_lora_b(model, std: float = 0.05) -> None:
    """A trained adapter has B != 0 (a fresh one has B = 0): then the LoRA path matters in the forward pass too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
