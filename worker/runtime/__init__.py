"""The Celery runtime: the app, the base task, the consumer and its signals, publishing ids to
the broker, the broker transports and the webhook client that delivers notices.

It may import ``worker.domain`` and ``config``; it must not import ``tasks``, ``producer``,
``worker.cli`` or ``worker.ops``.
"""
