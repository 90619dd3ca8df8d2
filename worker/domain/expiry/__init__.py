"""Token expiry: the sweep (expire, notify, retention, inbox pruning) and the reminders.

- :mod:`.budget`: the budgeted loop that every sweep phase and the reminders run: batches in
  short transactions until done or the time budget is spent, resumed by the next run.
- :mod:`.lock`: one run of a job at a time, across processes and schedulers.
- :mod:`.results`: what a run reports.
- :mod:`.sweep`: a sweep run and its phases in order: :mod:`.expire` (with :mod:`.table_walk`
  for a large backlog on Postgres), :mod:`.notify`, :mod:`.retention`, :mod:`.inbox_pruning`.
- :mod:`.reminders`: pre-expiry reminders.
- :mod:`.grouped_notices`, :mod:`.audit_rows`, :mod:`.cursors`: what those share.

Like all of ``worker.domain``, nothing here imports Celery, kombu, httpx or a web framework
(import-linter checks it).
"""
