"""Start a Celery worker the way ``tokenwarden worker`` starts tokenwarden's, for another app.

bench/events.py runs its no-op app (``bench._noop_app``) with this, so that the only difference
from ``tokenwarden worker`` is what the tasks do: logging set up first, ``--quiet``, the same
flags as worker/cli/runtime.py, and a node name of its own (two workers named alike on one
host fight over RabbitMQ's exclusive remote-control queue, and one of them dies)::

    python -m bench._worker bench._noop_app --pool prefork --concurrency 2 --hostname b-1@%h
"""

from __future__ import annotations

import argparse
import importlib

from bench.common import WORKER_FLAGS
from tokenwarden.config.logging import configure_logging


def main(argv: list[str] | None = None) -> None:
    options = argparse.ArgumentParser(description=__doc__)
    options.add_argument(
        "module", help="module with the Celery app: worker.runtime.celery_app or bench._noop_app"
    )
    options.add_argument("--pool", choices=["prefork", "threads", "solo"], default="prefork")
    options.add_argument("--concurrency", type=int, default=None)
    options.add_argument("--log-level", default="info")
    options.add_argument("--hostname", required=True)
    args = options.parse_args(argv)
    configure_logging(level=args.log_level.upper())
    app = importlib.import_module(args.module).app
    worker_argv = ["--quiet", "worker", "--loglevel", args.log_level, "--pool", args.pool]
    worker_argv += [*WORKER_FLAGS, "--hostname", args.hostname]
    if args.concurrency:
        worker_argv += ["--concurrency", str(args.concurrency)]
    app.start(worker_argv)


if __name__ == "__main__":
    main()
