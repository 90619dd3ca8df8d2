"""``/docs`` works on a network without internet access, and can be switched off."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

KEY = "twp_docs_test_key_one"
# Every address the page makes the browser load: src=, href= and Swagger UI's `url: '…'`.
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")


def api(home: Path, **options: object) -> Iterator[TestClient]:
    settings = Settings(home=home, producer_keys=(KEY,), **options)  # type: ignore[arg-type]
    celery_app = make_celery(settings)
    with TestClient(create_app(settings, celery_app=celery_app)) as client:
        yield client
    celery_app.close()


@pytest.fixture
def docs_on(tmp_path: Path) -> Iterator[TestClient]:
    yield from api(tmp_path / "home")


@pytest.fixture
def docs_off(tmp_path: Path) -> Iterator[TestClient]:
    yield from api(tmp_path / "home", api_docs=False)


def test_the_docs_page_loads_only_its_own_files(docs_on: TestClient) -> None:
    page = docs_on.get("/docs")
    assert page.status_code == 200
    addresses = [a or b for a, b in REFERENCE.findall(page.text)]
    assert len(addresses) >= 3, page.text  # the script, the styles, the schema
    for address in addresses:
        # Same origin: a path, never another host (//cdn…, https://…).
        assert address.startswith("/"), address
        assert not address.startswith("//"), address
        fetched = docs_on.get(address)
        assert fetched.status_code == 200, address
        assert fetched.content, address
    scripts = [a for a in addresses if a.endswith(".js")]
    assert scripts, addresses
    assert "SwaggerUIBundle" in docs_on.get(scripts[0]).text
    assert "/openapi.json" in addresses
    assert "cdn" not in page.text.lower()


def test_docs_switched_off_leave_no_page_and_no_schema(docs_off: TestClient) -> None:
    for path in ("/docs", "/openapi.json", "/docs/static/swagger-ui-bundle.js", "/redoc"):
        assert docs_off.get(path).status_code == 404, path
    # The API itself still works.
    assert docs_off.get("/healthz").status_code == 200
