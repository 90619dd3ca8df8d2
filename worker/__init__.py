"""tokenwarden's worker, in layers: ``worker.domain`` (the rules, over SQLAlchemy),
``worker.runtime`` (Celery, the broker transports, the webhook client), ``worker.cli`` (the
``tokenwarden`` command) and ``worker.ops`` (the supervisor and the demo).

Each layer imports only those before it; the contracts in ``[tool.importlinter]`` check it.
"""
