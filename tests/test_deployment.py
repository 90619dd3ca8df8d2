"""The deployment files: the compose healthchecks, the env file, the constraints file.

``docker-compose config -q`` (in .ci/run) checks the compose file's syntax; these check what
it means: the scheduler's healthcheck tells a running scheduler from a stuck one, the
example env file holds settings tokenwarden accepts, and the installed packages are those
constraints.txt pins.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, TOKENWARDEN, clean_env
from tokenwarden.config.settings import ENV_PREFIX, Settings, load_settings

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / "deploy" / "tokenwarden.env.example"
CONSTRAINTS = REPO / "constraints.txt"
IMAGE_HOME = "/var/lib/tokenwarden"
OURS = ("migrate", "api", "worker", "scheduler")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def example_settings() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {name.strip(): value for name, value in pairs}


def healthcheck(service: str, home: Path) -> int:
    """Run the service's healthcheck command here, with the image's home replaced by ``home``."""
    test = compose()["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [sys.executable if part == "python" else part for part in test[1:]]
    argv = [part.replace(IMAGE_HOME, str(home)) for part in argv]
    return subprocess.run(argv, check=False, timeout=30).returncode


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[Path]:
    """``tokenwarden beat`` on a throw-away embedded home; the home."""
    home = tmp_path / "home"
    beat = subprocess.Popen(
        [str(TOKENWARDEN), "beat"],
        env=clean_env(TOKENWARDEN_HOME=str(home)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield home
    finally:
        beat.terminate()
        beat.wait(30)


@pytest.mark.slow
def test_the_scheduler_healthcheck_tells_a_running_scheduler_from_a_stuck_one(
    scheduler: Path,
) -> None:
    assert healthcheck("scheduler", scheduler) == 1  # nothing yet: not healthy
    deadline = time.monotonic() + 60
    while healthcheck("scheduler", scheduler) != 0:
        assert time.monotonic() < deadline, "the scheduler never wrote its schedule file"
        time.sleep(0.5)
    # A schedule file left untouched for more than five minutes: stuck.
    for path in scheduler.glob("celerybeat-schedule*"):
        stale = time.time() - 301
        os.utime(path, (stale, stale))
    assert healthcheck("scheduler", scheduler) == 1


def test_every_role_has_a_healthcheck_and_takes_its_settings_from_the_env_file() -> None:
    services = compose()["services"]
    for name in OURS:
        service = services[name]
        assert service["env_file"] == ["${TOKENWARDEN_ENV_FILE:-deploy/tokenwarden.env}"], name
        # Only what the stack itself decides is fixed here; the rest is the env file's.
        fixed = {key for key in service["environment"] if key.startswith(ENV_PREFIX)}
        assert fixed <= {
            "TOKENWARDEN_DATABASE_URL",
            "TOKENWARDEN_BROKER_URL",
            "TOKENWARDEN_HOME",
            "TOKENWARDEN_API_HOST",
            "TOKENWARDEN_WORKER_HEARTBEAT_FILE",
        }, name
        if name != "migrate":
            assert "healthcheck" in service, name


def test_the_example_env_file_holds_settings_tokenwarden_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = example_settings()
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert set(values) <= fields, set(values) - fields  # a misspelt name would be ignored
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKENWARDEN_DATABASE_URL", "postgresql://tokenwarden@postgres/tokenwarden")
    settings = load_settings()
    assert settings.api_docs is False  # the example keeps /docs off a public address


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(name)] = version.strip()
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_dependency_and_the_installed_versions_match_them() -> None:
    pins = pinned()
    assert "tokenwarden" not in pins
    requirements = metadata.requires("tokenwarden") or []
    for requirement in requirements:
        name = _normal(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} is not in constraints.txt: run `make constraints`"
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed == version, f"{name} {installed} installed, {version} pinned"


def test_the_image_and_the_install_use_the_constraints() -> None:
    assert "pip install --no-cache-dir -c constraints.txt ." in (REPO / "Dockerfile").read_text()
    assert "-c constraints.txt -e '.[test]'" in (REPO / "Makefile").read_text()
