"""dealrec workers: the Celery app, its tasks and the Redis job store shared with the API (`app/`)."""
