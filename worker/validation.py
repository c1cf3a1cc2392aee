"""Validates an uploaded dataset with core's loader: `ready` with statistics, or `invalid` with the
loader's file/line/field errors (file names relative to the upload, never server paths)."""

from __future__ import annotations

import logging

from core.data import DataError, detect_format, load_dataset
from worker.deliveries import PARKED_CODE, PARKED_DATASET, Delivery
from worker.runner import describe, relative_error
from worker.service.files import Files
from worker.service.jobstore import JobStore
from worker.service.records import utcnow
from worker.service.uploads import validation_sent, validation_work

log = logging.getLogger(__name__)


def validate_dataset(store: JobStore, files: Files, dataset_id: str) -> str:
    """Returns the dataset's status afterwards. Only a `validating` dataset is examined, so a
    redelivered message does nothing twice."""
    rec = store.get_dataset(dataset_id)
    if rec is None or rec.status != "validating":
        return rec.status if rec else "missing"
    validation_sent(store, dataset_id)  # its task came (the API that sent it may have died before saying so)
    with Delivery(store, validation_work(dataset_id)) as delivery:
        if delivery.parked:
            return _finish(store, dataset_id, "invalid", errors=[{"code": PARKED_CODE, "message": PARKED_DATASET}])
        return _validate(store, files, dataset_id)


def _validate(store: JobStore, files: Files, dataset_id: str) -> str:
    folder = files.dataset_files(dataset_id)
    try:
        fmt = detect_format(folder)
        ds = load_dataset(folder, fmt=fmt)
    except DataError as exc:
        info = relative_error(exc, folder)
        error = {"code": "invalid_dataset", **info, "message": describe(info)}
        return _finish(store, dataset_id, "invalid", errors=[error])
    except OSError as exc:  # its str() names server paths; strerror does not
        return _finish(store, dataset_id, "invalid",
                       errors=[{"code": "invalid_dataset", "message": f"cannot read the files: {exc.strerror}"}])
    except ValueError as exc:
        return _finish(store, dataset_id, "invalid", errors=[{"code": "invalid_dataset", "message": str(exc)}])
    except Exception as exc:  # noqa: BLE001 - never leave a dataset `validating` forever
        log.exception("dataset %s: validation crashed", dataset_id)
        return _finish(store, dataset_id, "invalid",
                       errors=[{"code": "internal_error", "message": f"validation failed: {type(exc).__name__}"}])
    stats = ds.statistics()
    return _finish(store, dataset_id, "ready", format=fmt, statistics=stats, fingerprint=ds.fingerprint)


def _finish(store: JobStore, dataset_id: str, status: str, **fields) -> str:
    ok = store.update_dataset(dataset_id, allowed=["validating"], status=status,
                              validated_at=utcnow().isoformat(), **fields)
    log.info("dataset %s: %s", dataset_id, status if ok else "changed meanwhile")
    return status
