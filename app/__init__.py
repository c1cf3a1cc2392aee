"""dealrec REST API (FastAPI): thin routers over the service layer (`worker.service`): datasets, prune jobs,
results; state in its Redis job store, work handed to the workers through Celery."""
