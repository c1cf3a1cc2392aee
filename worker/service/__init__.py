"""The service layer that the API (`app/`) and the workers (`worker/`) share: what a job and a
dataset are, where their state and files live, and how a job is created.

- `settings`: the `DEALREC_*` configuration;
- `records`: the records the job store holds (datasets, jobs, events);
- `requests` / `responses`: the API's contract (`POST /v1/prune` and what the routes return);
- `jobstore`: the Redis job store (records, events, locks, idempotency, the stalled-job reaper's view);
- `files`: the storage root's folders (uploads, datasets, job outputs, core's cache);
- `plan`: which stages a job runs and on which Celery queue;
- `jobs`: creating a prune job (checks, parameters, idempotency, the first task);
- `quotas`: the per-tenant limits (jobs, datasets, stored bytes) and fair dispatch's held jobs;
- `dispatch`: handing released jobs to the broker (API, workers, the reaper).

It sits in `worker/` because the design card fixes the top level (core/, worker/, app/); nothing in
it imports `app/`, and the API imports only this layer and the Celery app from `worker/`, so the API
process never loads torch. Imports go app -> worker.service -> core, worker -> worker.service -> core.
"""
