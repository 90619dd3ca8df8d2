"""The limit bench/ingest.py and bench/introspect.py compare with: an empty ``POST /v1/events``
and ``POST /v1/introspect`` on the same server.

It reads the whole body and answers ``202`` with a fixed small JSON body, nothing else: no key
check, no validation, no database, no broker. It is served exactly as ``tokenwarden api``
serves the producer API (worker/cli/runtime.py): our logging set up first, then
``uvicorn.run`` with the same options and one process::

    python -m bench._empty_api --port 8001 --log-level info
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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from tokenwarden.config.logging import configure_logging
    from tokenwarden.producer.serving import uvicorn_options

    options = argparse.ArgumentParser(description=__doc__)
    options.add_argument("--host", default="127.0.0.1")
    options.add_argument("--port", type=int, required=True)
    options.add_argument("--log-level", default="info")
    args = options.parse_args(argv)
    configure_logging(level=args.log_level.upper())
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level,
        access_log=False,
        **uvicorn_options(),
    )


if __name__ == "__main__":
    main()
