"""`client.datasets`: upload (a folder, files, one archive, or contents in memory), get, list, delete."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, Any

from dealrec_client._http import Transport
from dealrec_client.errors import InvalidDatasetError, WaitTimeoutError

# A folder (its regular files), one file (data file or .zip/.tar.gz), several files, or name -> bytes.
DatasetSource = str | PathLike | Sequence[str | PathLike] | Mapping[str, bytes]


@dataclass
class Dataset:
    """A dataset as the API describes it (`raw` keeps the whole JSON)."""

    id: str
    status: str
    name: str | None = None
    format: str | None = None
    fingerprint: str | None = None
    statistics: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    parent_id: str | None = None
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Dataset:
        return cls(id=data["id"], status=data["status"], name=data.get("name"), format=data.get("format"),
                   fingerprint=data.get("fingerprint"), statistics=data.get("statistics"),
                   errors=list(data.get("errors") or []), files=list(data.get("files") or []),
                   parent_id=data.get("parent_id"), created_at=data.get("created_at"), raw=data)


def _files(source: DatasetSource) -> list[tuple[str, Path | bytes]]:
    if isinstance(source, Mapping):
        return [(str(name), bytes(data)) for name, data in source.items()]
    paths = [Path(source)] if isinstance(source, (str, PathLike)) else [Path(p) for p in source]
    out: list[tuple[str, Path | bytes]] = []
    for p in paths:
        if p.is_dir():
            out += [(f.name, f) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
        elif p.is_file():
            out.append((p.name, p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not out:
        raise ValueError(f"no files to upload in {source}")
    return out


class Datasets:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def upload(self, source: DatasetSource, *, name: str | None = None, wait: bool = True,
               timeout: float | None = 600.0, poll_interval: float = 0.5) -> Dataset:
        """Upload a dataset; with `wait`, return it once validated (`ready`) or raise
        InvalidDatasetError (file, line, field) for a malformed file, at upload or at validation.
        Not retried: an upload is not idempotent (a retry could store the dataset twice)."""
        with ExitStack() as stack:
            parts: list[tuple[str, tuple[str, IO[bytes] | bytes, str]]] = []
            for fname, content in _files(source):
                body = stack.enter_context(open(content, "rb")) if isinstance(content, Path) else content
                parts.append(("files", (fname, body, "application/octet-stream")))
            params = {"name": name} if name else None
            data = self._t.json("POST", "/v1/datasets", files=parts, params=params)
        ds = Dataset.from_api(data)
        return self.wait(ds.id, timeout=timeout, poll_interval=poll_interval) if wait else ds

    def wait(self, dataset_id: str, *, timeout: float | None = 600.0, poll_interval: float = 0.5) -> Dataset:
        """The dataset once its validation has finished; InvalidDatasetError when it is `invalid`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ds = self.get(dataset_id)
            if ds.status == "invalid":
                first = ds.errors[0] if ds.errors else {"code": "invalid_dataset", "message": "invalid dataset"}
                raise InvalidDatasetError(None, str(first.get("code") or "invalid_dataset"),
                                          str(first.get("message")), {**first, "errors": ds.errors})
            if ds.status != "validating":
                return ds
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"dataset {dataset_id} still validating after {timeout} s")
            time.sleep(poll_interval)

    def get(self, dataset_id: str) -> Dataset:
        return Dataset.from_api(self._t.json("GET", f"/v1/datasets/{dataset_id}"))

    def list(self, *, limit: int | None = None, page_size: int = 100) -> list[Dataset]:
        """The tenant's datasets, newest first, every page (or the first `limit`)."""
        return list(self.iter(limit=limit, page_size=page_size))

    def iter(self, *, limit: int | None = None, page_size: int = 100) -> Iterator[Dataset]:
        cursor, n = None, 0
        while True:
            params: dict[str, Any] = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
            page = self._t.json("GET", "/v1/datasets", params=params)
            for item in page["items"]:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield Dataset.from_api(item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def delete(self, dataset_id: str) -> None:
        self._t.request("DELETE", f"/v1/datasets/{dataset_id}")
