"""The limit bench/ingest.py and bench/introspect.py compare with: an empty ``POST /v1/events``
and ``POST /v1/introspect`` on the same server.

It reads the whole body and answers ``202`` with a fixed small JSON body, nothing else: no key
check, no validation, no database, no broker. It is served exactly as ``tokenwarden api``
serves the producer API (worker/cli/runtime.py): our logging set up first, then
``uvicorn.run`` with the same options and as many processes (``--workers``, default 1), each
set up as the API's are (producer/serving.py)::

    python -m bench._empty_api --port 8001 --log-level info [--workers 2]
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def create_app() -> FastAPI:
    app = FastAPI(title="empty endpoint")

    @app.post("/v1/events", status_code=202)
    async def post_events(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"accepted": []}, status_code=202)

    @app.post("/v1/introspect")
    async def introspect(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"active": False})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


def app_of_one_process() -> FastAPI:
    """The empty endpoint in one of the processes uvicorn starts for ``--workers N``."""
    from tokenwarden.producer.serving import prepare_process

    prepare_process()
    return create_app()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from tokenwarden.config.logging import configure_logging
    from tokenwarden.producer.serving import uvicorn_options

    options = argparse.ArgumentParser(description=__doc__)
    options.add_argument("--host", default="127.0.0.1")
    options.add_argument("--port", type=int, required=True)
    options.add_argument("--log-level", default="info")
    options.add_argument("--workers", type=int, default=1, help="processes (1)")
    args = options.parse_args(argv)
    if args.workers < 1:
        options.error("--workers must be at least 1")
    configure_logging(level=args.log_level.upper())
    uvicorn.run(
        create_app() if args.workers == 1 else "bench._empty_api:app_of_one_process",
        host=args.host,
        port=args.port,
        factory=args.workers > 1,
        log_config=None,
        log_level=args.log_level,
        **uvicorn_options(workers=args.workers),
    )


if __name__ == "__main__":
    main()
