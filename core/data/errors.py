"""Errors raised while reading a dataset: each one names the file, the line and the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# A value quoted in an error is cut to this many characters (its length said), a whole message to
# MAX_MESSAGE: a 256 MB token must never be copied into an error, its log line or a stored record.
MAX_SHOWN = 200
MAX_MESSAGE = 1000


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, or its first `limit` characters followed by its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters. Text is cut before repr,
    so a huge value is never copied whole."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    return clip(repr(value), limit)


class DataError(ValueError):
    """A dataset that cannot be loaded. `str()` is a one-line message fit for a CLI or an HTTP body."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = clip(field, MAX_SHOWN) if field is not None else None
        self.reason = message = clip(message)
        where = []
        if self.file is not None:
            where.append(Path(self.file).name if len(str(self.file)) > 120 else self.file)
        if line is not None:
            where.append(f"line {line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.reason}

    def for_client(self, root: str | Path) -> dict:
        """`to_dict()` as a service's client may see it, for a dataset stored in folder `root`: the file
        relative to `root` (its bare name when outside it, None for `root` itself) and `root`'s path
        taken out of the message, which may quote a library's text (pyarrow names the full path)."""
        info = self.to_dict()
        root = Path(root)
        if info["file"]:
            try:
                rel = str(Path(info["file"]).resolve().relative_to(root.resolve()))
                info["file"] = None if rel == "." else rel
            except ValueError:
                info["file"] = Path(info["file"]).name
        message = str(info["message"])
        for prefix in dict.fromkeys((str(root.resolve()), str(root))):
            message = message.replace(f"{prefix}/", "").replace(prefix, "")
            message = _without_cut_prefix(message, prefix)
        info["message"] = message
        return info


_CLIPPED = re.compile(r"\.\.\. \([\d,]+ characters\)$")


def _without_cut_prefix(message: str, prefix: str) -> str:
    """A message that `clip` cut in the middle of `prefix` (a server path) without that path's start."""
    cut = _CLIPPED.search(message)
    if cut is None:
        return message
    body = message[:cut.start()]
    for k in range(min(len(prefix), len(body)), 1, -1):
        if body.endswith(prefix[:k]):
            return body[:-k] + message[cut.start():]
    return message
