"""Python client of the dealrec service (httpx only: no torch, no dealrec core).

    from dealrec_client import Client
    client = Client("http://127.0.0.1:8000", api_key=KEY)
    ds = client.datasets.upload("data/games", name="games")
    job = client.jobs.create(ds, budget=64, method="influence").wait(progress=True)
    user_ids = job.selection()
"""

from dealrec_client.client import Client
from dealrec_client.datasets import Dataset, Datasets
from dealrec_client.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DealrecError,
    InternalServerError,
    InvalidDatasetError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from dealrec_client.jobs import Job, Jobs

__all__ = [
    "APIConnectionError", "APIStatusError", "AuthenticationError", "BadRequestError", "Client", "ConflictError",
    "Dataset", "Datasets", "DealrecError", "InternalServerError", "InvalidDatasetError", "Job", "JobFailedError",
    "Jobs", "NotFoundError", "PayloadTooLargeError", "PermissionDeniedError", "QuotaExceededError",
    "ServiceUnavailableError",
    "UnprocessableEntityError", "WaitTimeoutError",
]
