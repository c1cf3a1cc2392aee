"""What every command shares: the usage error, exit codes, progress bars, a parameter error said
with the flag that set it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("dealrec")

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    pass


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# A parameter error names the flag that set it, where there is one.
FLAGS = {"selection.budget": "--budget", "selection.method": "--method", "selection.lambda": "--lambda",
         "selection.strata": "--strata", "selection.hard_prune": "--hard-prune", "seed": "--seed",
         "surrogate.epochs": "--epochs", "effort.cutoff_len": "--cutoff-len", "effort.processes": "--effort-processes",
         "influence.solver": "--solver"}


def usage_error(exc, set_by: dict[str, str] | None = None) -> UsageError:
    """A core.params.ParamsError as the CLI says it: the flag that set the field (`set_by`: the
    `--surrogate FIELD=` / `--influence FIELD=` items of `dealrec prune`, then the dedicated flags),
    the section's flag for a rule across its fields, else the field's dotted name."""
    if set_by and exc.field in set_by:
        return UsageError(f"{set_by[exc.field]}: {exc.message}")
    if exc.field in FLAGS:
        return UsageError(f"{FLAGS[exc.field]} {exc.message}")
    section, _, name = exc.field.partition(".")
    if section in ("surrogate", "influence"):
        return UsageError(f"--{section}{' ' + name if name else ''}: {exc.message}")
    return UsageError(f"invalid parameter {exc.field}: {exc.message}")


class Bars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, stage: str, frac: float, msg: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(
                total=1000, desc=f"{stage:<10}", unit="‰", leave=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        bar.n = int(round(frac * 1000))
        if msg:
            bar.set_postfix_str(msg, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def validated_params(model, raw: dict):
    from core.params import ParamsError, validated

    try:
        return validated(model, raw)
    except ParamsError as exc:
        raise usage_error(exc) from None


def cache_dir_of(args: argparse.Namespace) -> Path:
    from core.cache import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()
