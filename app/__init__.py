"""dealrec REST API (FastAPI): datasets, prune jobs, results; state in the job store (`worker.store`)."""
