"""`client.jobs`: create a prune job (an Idempotency-Key sent with each), get, list; a `Job` that
refreshes, waits (with a progress bar on a terminal), cancels, and reads its events and results."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any, Literal, overload

from dealrec_client._http import Transport
from dealrec_client.errors import ConflictError, JobFailedError, WaitTimeoutError
from dealrec_client.progress import ProgressLine

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# What `dealrec prune --out` writes, and the endpoint of each (diagnostics.json where the job has one).
OUTPUT_FILES = {
    "selection.json": "selection?format=json",
    "selection.csv": "selection?format=csv",
    "scores.csv": "scores?format=csv",
    "bigrec_train.jsonl": "bigrec_train.jsonl",
    "diagnostics.json": "diagnostics",
}
_INT_COLUMNS = ("index", "stratum", "selected", "prompt_tokens")
_FLOAT_COLUMNS = ("influence", "effort", "overall", "effort_raw")


class Job:
    """A job as last read from the API (`raw`), with its actions. Attributes mirror the API's fields."""

    def __init__(self, transport: Transport, data: dict[str, Any]) -> None:
        self._t = transport
        self.raw: dict[str, Any] = data

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r}, stage={self.stage!r}, progress={self.progress:.2f})"

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def status(self) -> str:
        return self.raw["status"]

    @property
    def stage(self) -> str | None:
        return self.raw.get("stage")

    @property
    def held_position(self) -> int | None:
        """A queued job waiting for one of the tenant's running jobs to end: its place in line (1 = next)."""
        return self.raw.get("held_position")

    @property
    def progress(self) -> float:
        return float(self.raw.get("progress") or 0.0)

    @property
    def dataset_id(self) -> str:
        return self.raw["dataset_id"]

    @property
    def params(self) -> dict[str, Any] | None:
        return self.raw.get("params")

    @property
    def result(self) -> dict[str, Any] | None:
        return self.raw.get("result")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.raw.get("error")

    @property
    def estimated_finish(self) -> str | None:
        return self.raw.get("estimated_finish")

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def refresh(self) -> Job:
        self.raw = self._t.json("GET", f"/v1/jobs/{self.id}")
        return self

    def wait(self, timeout: float | None = None, *, progress: bool = False, poll_interval: float = 1.0,
             check: bool = True) -> Job:
        """Poll until the job has finished; returns it. `timeout` (seconds) raises WaitTimeoutError
        (the job goes on); `progress` draws a bar on stderr (one line per stage elsewhere); `check`
        raises JobFailedError for a failed or cancelled job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressLine(self.id) if progress else None
        try:
            while True:
                self.refresh()
                if bar:
                    held = f" (held: #{self.held_position} in line)" if self.held_position else ""
                    bar.update(self.status + held, self.stage, self.progress, self.estimated_finish)
                if self.done:
                    break
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise WaitTimeoutError(f"job {self.id} is still {self.status} ({self.stage}, "
                                               f"{self.progress:.0%}) after {timeout} s")
                    time.sleep(min(poll_interval, left))
                else:
                    time.sleep(poll_interval)
        finally:
            if bar:
                bar.close()
        if check and self.status != "succeeded":
            err = self.error or {}
            raise JobFailedError(self.id, self.status, str(err.get("code") or self.status),
                                 str(err.get("message") or f"the job was {self.status}"))
        return self

    def cancel(self) -> Job:
        """Ask the job to stop (a queued job at once, a running one within a batch); a job that has
        already finished is left as it is."""
        try:
            self.raw = self._t.json("POST", f"/v1/jobs/{self.id}/cancel", retry=True)
        except ConflictError as exc:
            if exc.code != "job_finished":
                raise
            self.refresh()
        return self

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        """Every event after id `after` (all pages), oldest first: id, created_at, level, message, data."""
        out: list[dict[str, Any]] = []
        while True:
            page = self._t.json("GET", f"/v1/jobs/{self.id}/events", params={"after": after, "limit": 1000})
            out += page["items"]
            after = page["next_after"]
            if not page["has_more"]:
                return out

    @overload
    def selection(self, format: Literal["ids"] = "ids") -> list[str]: ...

    @overload
    def selection(self, format: Literal["json"]) -> dict[str, Any]: ...

    def selection(self, format: Literal["ids", "json"] = "ids") -> list[str] | dict[str, Any]:
        """The selected samples' source user ids in selection order, or `selection.json` as a dict."""
        doc = self._t.json("GET", f"/v1/jobs/{self.id}/selection", params={"format": "json"})
        return doc if format == "json" else [s["user_id"] for s in doc["selected"]]

    def scores(self) -> list[dict[str, Any]]:
        """`scores.csv` as rows: ints for index/stratum/selected/prompt_tokens, floats for the scores,
        None where the method computed no such score."""
        text = self._t.request("GET", f"/v1/jobs/{self.id}/scores", params={"format": "csv"}).text
        rows = []
        for row in csv.DictReader(io.StringIO(text)):
            out: dict[str, Any] = dict(row)
            for col in _INT_COLUMNS:
                if col in out:
                    out[col] = int(out[col]) if out[col] not in ("", None) else None
            for col in _FLOAT_COLUMNS:
                if col in out:
                    out[col] = float(out[col]) if out[col] not in ("", None) else None
            rows.append(out)
        return rows

    def diagnostics(self) -> dict[str, Any]:
        return self._t.json("GET", f"/v1/jobs/{self.id}/diagnostics")

    def download(self, name: str, dest: str | PathLike) -> Path:
        """One output file (a key of OUTPUT_FILES) to `dest` (a folder, or a file path)."""
        if name not in OUTPUT_FILES:
            raise ValueError(f"unknown output {name!r}: one of {', '.join(OUTPUT_FILES)}")
        dest = Path(dest)
        path = dest / name if dest.is_dir() else dest
        self._save(f"/v1/jobs/{self.id}/{OUTPUT_FILES[name]}", path)
        return path

    def download_outputs(self, out_dir: str | PathLike) -> dict[str, Path]:
        """The files `dealrec prune --out` writes (selection.json/.csv, scores.csv, bigrec_train.jsonl
        and diagnostics.json when the job has it), byte for byte as the service stored them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in OUTPUT_FILES:
            if name == "diagnostics.json" and "diagnostics" not in ((self.result or {}).get("links") or {}):
                continue
            paths[name] = self.download(name, out)
        return paths

    def download_adapter(self, out_dir: str | PathLike) -> Path:
        """The fine-tuned LoRA adapter, unpacked into `out_dir` (its peft files and finetune.json)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "adapter.tar.gz"
            self._save(f"/v1/jobs/{self.id}/adapter", archive)
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    rel = Path(*[p for p in Path(member.name).parts if p not in ("", ".", "..", "/")])
                    if rel.parts and rel.parts[0] == "adapter":  # the archive holds adapter/...
                        rel = Path(*rel.parts[1:])
                    if not rel.parts:
                        continue
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        return out

    def _save(self, url: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")
        with self._t.stream(url) as response, open(part, "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
        part.replace(path)


class Jobs:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(self, dataset_id: str | Any, *, budget: int | float | str | None = None, method: str | None = None,
               seed: int | None = None, limit_users: int | None = None, split: str | None = None,
               params: dict[str, Any] | None = None, finetune: dict[str, Any] | None = None,
               warm_start: bool | None = None, idempotency_key: str | None = None) -> Job:
        """Start a prune job (`POST /v1/prune`); omitted arguments take the service's defaults.
        `dataset_id` may be a Dataset. An Idempotency-Key is sent (a fresh one unless given), so the
        call is retried safely: a repeat returns the same job instead of starting a second one."""
        ds = getattr(dataset_id, "id", dataset_id)
        if isinstance(budget, str):
            budget = float(budget) if any(c in budget for c in ".eE") else int(budget)
        body: dict[str, Any] = {"dataset_id": ds}
        for key, value in (("budget", budget), ("method", method), ("seed", seed), ("limit_users", limit_users),
                           ("split", split), ("params", params), ("finetune", finetune), ("warm_start", warm_start)):
            if value is not None:
                body[key] = value
        key = idempotency_key or uuid.uuid4().hex
        return Job(self._t, self._t.json("POST", "/v1/prune", json=body, headers={"Idempotency-Key": key}))

    def get(self, job_id: str) -> Job:
        return Job(self._t, self._t.json("GET", f"/v1/jobs/{job_id}"))

    def list(self, *, status: str | None = None, limit: int | None = None, page_size: int = 100) -> list[Job]:
        """The tenant's jobs, newest first (every page, or the first `limit`), optionally of one status."""
        return list(self.iter(status=status, limit=limit, page_size=page_size))

    def iter(self, *, status: str | None = None, limit: int | None = None, page_size: int = 100) -> Iterator[Job]:
        cursor, n = None, 0
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self._t.json("GET", "/v1/jobs", params=params)
            for item in page["items"]:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield Job(self._t, item)
            cursor = page.get("next_cursor")
            if not cursor:
                return
