"""BIGRec generation speed: the batched, prompt-once generation of core.evaluate.generate against the
plain `model.generate` it replaced, on the same test prompts, in one run.

    python bench/generation.py --data ../shared/datasets/games --limit-users 10000 --users 64 [--json]

Rows (same users, same settings: --num-beams, --max-new-tokens; fp32 on the CPU):
- `one-by-one`: plain `model.generate`, one user at a time (the reference's procedure);
- `plain, batch B`: plain `model.generate` on left-padded batches of B (what the evaluation ran
  before: B = 4);
- `batched, batch B`: `generate_batched` (each prompt run once, not once per beam; the shared
  prefix run once for all users), with the answer NLL computed in the same pass.
Each row reports seconds per user, generated tokens per second and the speed-up over the plain rows;
the texts of every batched row must equal the one-by-one texts. The model is the base LLM with a
LoRA adapter whose B weights are random (as after training; a fresh adapter is the base model), or
--adapter DIR. With --json the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cache import default_cache_dir  # noqa: E402
from core.config import LLMEvalConfig  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.effort.llm import load_base_model, resolve_llm  # noqa: E402
from core.effort.prompts import PromptTemplate, tokenize_samples  # noqa: E402
from core.evaluate.bigrec import answer_tokens, select_test_users  # noqa: E402
from core.evaluate.generate import generate_batched, generate_plain  # noqa: E402

log = logging.getLogger("bench.generation")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit-users", type=int, default=None)
    ap.add_argument("--users", type=int, default=64, help="test users timed (a seeded subset; 64)")
    ap.add_argument("--llm", default="auto")
    ap.add_argument("--adapter", default=None, help="a peft adapter folder (default: random LoRA B, seed 0)")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--plain-batch", type=int, default=4, help="batch of the plain row (4: the old default)")
    ap.add_argument("--batches", default="4,16", help="batch sizes of the batched rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def load_model(args, cache_dir: Path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = load_base_model(resolve_llm(args.llm), cache_dir)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=False)
    else:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model.eval(), tok


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    ds = load_dataset(args.data, limit_users=args.limit_users)
    model, tok = load_model(args, cache_dir)
    users = select_test_users(ds, args.users, seed=0)
    samples = tokenize_samples(ds, users, tok, LLMEvalConfig().cutoff_len, PromptTemplate(), split="test")
    prompts = [s.ids for s in samples]
    answers = answer_tokens(ds, samples, tok)
    settings = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    rows = []

    def plain_row(name: str, batch: int) -> list[str]:
        t0 = time.perf_counter()
        texts = generate_plain(model, tok, prompts, batch_size=batch, **settings)
        seconds = time.perf_counter() - t0
        rows.append({"row": name, "batch": batch, "seconds": seconds, "texts": texts})
        log.info("%s: %.2f s/user", name, seconds / len(prompts))
        return texts

    reference = plain_row("one-by-one", 1)
    plain_row(f"plain, batch {args.plain_batch}", args.plain_batch)
    for batch in [int(b) for b in args.batches.split(",")]:
        got = generate_batched(model, tok, prompts, answers, batch_size=batch, **settings)
        rows.append({"row": f"batched, batch {batch}", "batch": batch, "seconds": got.seconds, "texts": got.texts,
                     "new_tokens": got.new_tokens})
        log.info("batched %d: %.2f s/user", batch, got.seconds / len(prompts))
    # Tokens generated: the same texts for every row, counted once by the batched pass.
    new_tokens = next(r["new_tokens"] for r in rows if "new_tokens" in r)
    one, plain = rows[0]["seconds"], rows[1]["seconds"]
    report = {"users": len(prompts), "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
              "new_tokens": new_tokens, "threads": args.threads, **settings, "rows": []}
    for r in rows:
        report["rows"].append({
            "row": r["row"], "s_per_user": r["seconds"] / len(prompts), "tokens_per_s": new_tokens / r["seconds"],
            "speedup_vs_one_by_one": one / r["seconds"], "speedup_vs_plain_batch": plain / r["seconds"],
            "texts_equal_one_by_one": r["texts"] == reference,
            "texts_differing": sum(a != b for a, b in zip(r["texts"], reference))})
    lines = ["| row | s/user | generated tokens/s | vs one-by-one | vs plain batch | texts = one-by-one |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        equal = "yes" if r["texts_equal_one_by_one"] else f"no ({r['texts_differing']} differ)"
        lines.append(f"| {r['row']} | {r['s_per_user']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_one_by_one']:.2f}x | {r['speedup_vs_plain_batch']:.2f}x | {equal} |")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
