"""`dealrec` command line: prune a dataset, inspect or extend a dataset, fine-tune the LLM on a
selection, evaluate the LLM recommender, look after the cache. One module per command group; this one dispatches.

Bad input ends with one clear message on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from core.cli.cache import cmd_cache
from core.cli.common import EXIT_BAD_INPUT, UsageError
from core.cli.data import cmd_extend, cmd_inspect
from core.cli.llm import cmd_evaluate, cmd_finetune, read_selection
from core.cli.parser import build_parser
from core.cli.prune import cmd_prune, prune_overrides

__all__ = ["EXIT_BAD_INPUT", "UsageError", "build_parser", "main", "prune_overrides", "read_selection"]


def main(argv: list[str] | None = None, extra_commands: Callable[[Any], None] | None = None,
         extra_handlers: dict[str, Callable[[argparse.Namespace], int]] | None = None) -> int:
    parser = build_parser(extra_commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if extra_handlers and args.command in extra_handlers:
        try:
            return extra_handlers[args.command](args)
        except UsageError as exc:
            sys.stderr.write(f"dealrec: error: {exc}\n")
            return EXIT_BAD_INPUT
    from core.data import DataError
    from core.effort.llm import LLMError

    try:
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "extend":
            return cmd_extend(args)
        if args.command == "finetune":
            return cmd_finetune(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "cache":
            return cmd_cache(args)
        return cmd_prune(args)
    except (DataError, LLMError, UsageError) as exc:
        sys.stderr.write(f"dealrec: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        resumable = args.command in ("finetune", "evaluate")  # their checkpoint / generation journal is kept
        sys.stderr.write("dealrec: interrupted" + ("; rerun the same command to resume from its last saved state\n"
                                                   if resumable else "\n"))
        return 130
