"""The FastAPI app with its documentation page served from local files, or without one.

Swagger UI's scripts and styles come from the files the ``fastapi-offline`` package ships,
under ``/docs/static``, so ``/docs`` works on a network without internet access (FastAPI's
own page loads them from a CDN). ``TOKENWARDEN_API_DOCS=false`` removes ``/docs`` and
``/openapi.json`` altogether, for an API whose address is public.
"""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from tokenwarden.config.settings import Settings

DOCS_URL: Final = "/docs"
STATIC_URL: Final = "/docs/static"


def make_app(settings: Settings, **options: Any) -> FastAPI:
    """A FastAPI app built with ``options``; its documentation as ``settings`` asks."""
    if not settings.api_docs:
        return FastAPI(docs_url=None, redoc_url=None, openapi_url=None, **options)
    return FastAPIOffline(docs_url=DOCS_URL, redoc_url=None, static_url=STATIC_URL, **options)
