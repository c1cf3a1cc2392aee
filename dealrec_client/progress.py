"""`Job.wait(progress=True)`: a one-line bar on a terminal, or one line per change of stage elsewhere
(a log file or CI output would otherwise fill with carriage returns)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import TextIO


def _eta(estimated_finish: str | None) -> str:
    if not estimated_finish:
        return ""
    try:
        left = (datetime.fromisoformat(estimated_finish.replace("Z", "+00:00")) - datetime.now(timezone.utc))
    except ValueError:
        return ""
    s = max(0, int(left.total_seconds()))
    return f" ETA {s // 60}:{s % 60:02d}"


class ProgressLine:
    def __init__(self, job_id: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.job_id = job_id
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.last: tuple[str, str | None] | None = None

    def update(self, status: str, stage: str | None, progress: float, estimated_finish: str | None) -> None:
        if self.tty:
            filled = int(round(self.width * max(0.0, min(1.0, progress))))
            bar = "#" * filled + "-" * (self.width - filled)
            where = f"{status} {stage}" if stage else status
            line = f"{self.job_id} [{bar}] {progress:4.0%} {where}{_eta(estimated_finish)}"
            self.stream.write("\r" + line.ljust(100)[:100])
            self.stream.flush()
        elif (status, stage) != self.last:
            self.stream.write(f"{self.job_id}: {status}{f' {stage}' if stage else ''} ({progress:.0%})\n")
            self.stream.flush()
        self.last = (status, stage)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
