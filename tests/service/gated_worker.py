"""`python gated_worker.py -A worker.celery_app worker ...`: a Celery worker whose every LLM load waits
until the test lets it go, so that a test can act while a worker is loading the LLM (a real load of
SmolLM2 takes 20-40 s the first time; the tiny test model loads in a blink).

The load itself is the real one: the process signals that it started one by creating
`$DEALREC_TEST_LOAD_GATE/loading`, waits for `$DEALREC_TEST_LOAD_GATE/release` (five minutes at
most), then loads. Only the worker the test starts this way has the gate; the service has none."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import core.effort.llm as llm

GATE = Path(os.environ["DEALREC_TEST_LOAD_GATE"])
_load = llm.load_base_model


def gated_load(*args, **kwargs):
    (GATE / "loading").touch()
    deadline = time.monotonic() + 300
    while not (GATE / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _load(*args, **kwargs)


llm.load_base_model = gated_load

if __name__ == "__main__":
    from celery.__main__ import main

    sys.exit(main())
