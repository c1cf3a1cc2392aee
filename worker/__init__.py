"""dealrec workers: the Celery app (`celery_app`), its tasks (`tasks`), the runner that walks a job's
stages through core's stage protocol (`runner`, `progress`, `validation`), and the service layer
they share with the API (`service`: settings, records, contract, job store, files, plan, job creation)."""
