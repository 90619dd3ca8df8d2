"""``tokenwarden run``, ``worker``, ``beat`` and ``api``: the long-running roles."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click
import structlog

from tokenwarden.config.settings import ENV_PREFIX, Settings, get_settings, without_password
from tokenwarden.worker.cli.common import (
    echo_table,
    fail,
    said_new_store,
    settings,
    store,
    store_failed,
)
from tokenwarden.worker.domain import db
from tokenwarden.worker.ops.supervisor import Stack, command, port_in_use, wait_for_http


def _configure_logging(level: str) -> None:
    from tokenwarden.config.logging import configure_logging

    configure_logging(level=level.upper())


def _require_schema(current: Settings) -> None:
    store(current)  # fails with a one-line reason when the schema is missing or old


def _warn_if_broker_unreachable(current: Settings, celery_app: Any, role: str) -> None:
    """One line naming the setting when the broker does not answer now; the role waits for it.

    A broker that is down is not a configuration error: the worker and the scheduler keep
    retrying, and the API keeps storing events that the re-drive publishes later.
    """
    if current.broker_url is None:
        return  # the embedded broker is a folder: nothing to reach
    from tokenwarden.worker.runtime.publishing import broker_of, broker_unreachable

    problem = broker_unreachable(celery_app)
    if problem is not None:
        structlog.get_logger(__name__).warning(
            "broker.unreachable",
            setting=f"{ENV_PREFIX}BROKER_URL",
            broker=broker_of(celery_app),
            error=problem,
            role=role,
            then=_WAITING[role],
        )


_WAITING = {
    "worker": "retrying until the broker answers",
    "beat": "retrying until the broker answers",
    "api": "storing events; the re-drive publishes them once the broker answers",
}


@click.command()
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (default: one per core).",
)
@click.option("--pool", type=click.Choice(["prefork", "threads", "solo"]), default="prefork")
@click.option("--log-level", default="info", show_default=True)
def worker(concurrency: int | None, pool: str, log_level: str) -> None:
    """Run the Celery worker that applies events."""
    current = settings()
    _require_schema(current)
    _configure_logging(log_level)
    from tokenwarden.worker.runtime.celery_app import app

    _warn_if_broker_unreachable(current, app, "worker")
    argv = [
        "--quiet",
        "worker",
        "--loglevel",
        log_level,
        "--pool",
        pool,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        # A node name of its own: two workers on one host (or two deployments sharing a
        # broker) must not fight over the same remote-control queue.
        "--hostname",
        f"{current.queue}.{os.getpid()}@%h",
    ]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    sys.exit(app.start(argv))  # Celery's exit status (1 after an unrecoverable error)


@click.command()
@click.option("--log-level", default="info", show_default=True)
def beat(log_level: str) -> None:
    """Run the scheduler (the inbox re-drive, and the other periodic jobs)."""
    current = settings()
    _require_schema(current)
    current.ensure_home()
    _configure_logging(log_level)
    from tokenwarden.worker.runtime.celery_app import app

    _warn_if_broker_unreachable(current, app, "beat")
    sys.exit(app.start(["--quiet", "beat", "--loglevel", log_level]))


@click.command()
@click.option("--host", default=None, help="Bind address (default TOKENWARDEN_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default TOKENWARDEN_API_PORT).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes serving the port (default TOKENWARDEN_API_WORKERS, else 1).",
)
@click.option("--log-level", default="info", show_default=True)
def api(host: str | None, port: int | None, workers: int | None, log_level: str) -> None:
    """Run the producer API."""
    import uvicorn

    from tokenwarden.producer.serving import APP_FACTORY, uvicorn_options

    current = settings()
    _require_schema(current)
    _configure_logging(log_level)
    from tokenwarden.worker.runtime.celery_app import make_celery

    probe = make_celery(current)
    _warn_if_broker_unreachable(current, probe, "api")
    probe.close()
    workers = workers or current.api_workers
    if workers == 1:
        from tokenwarden.producer.api import create_app

        app: Any = create_app(current)
    else:
        # uvicorn binds the port once here, for processes that each import the app.
        app = APP_FACTORY
    uvicorn.run(
        app,
        host=host or current.api_host,
        port=port or current.api_port,
        factory=workers > 1,
        log_config=None,
        log_level=log_level,
        **uvicorn_options(workers=workers),
    )


@click.command()
@click.option("--port", type=int, default=None, help="API port (default TOKENWARDEN_API_PORT).")
@click.option("--json", "as_json", is_flag=True, help="Print the start-up facts as JSON.")
def run(port: int | None, as_json: bool) -> None:
    """API, worker and scheduler in one go, on whatever the configuration names."""
    if port is not None:
        if not 0 < port < 65536:
            fail(f"--port: must be from 1 to 65535, not {port}")
        os.environ[f"{ENV_PREFIX}API_PORT"] = str(port)  # for this process and its children
        get_settings.cache_clear()
    current = settings()
    if port_in_use(current.api_host, current.api_port):
        fail(
            f"port {current.api_port} on {current.api_host} is in use (another tokenwarden "
            f"run?); stop it, or choose another with {ENV_PREFIX}API_PORT or --port"
        )
    url = current.resolved_database_url
    fresh = current.database_url is None and not (current.home / "tokenwarden.db").exists()
    try:
        db.upgrade(url)
    except Exception as error:
        store_failed(current, "prepare", error)
    if fresh:
        said_new_store(current)
    key = None if current.producer_keys else current.generated_producer_key()
    base = f"http://{current.api_host}:{current.api_port}"
    stack = Stack(
        {"api": command("api"), "worker": command("worker"), "scheduler": command("beat")},
        # Orphaned, the worker is killed outright: its warm shutdown takes seconds, and what
        # it had not acknowledged is delivered again (or re-driven from the inbox).
        orphan_signal={"worker": signal.SIGKILL},
    )
    stack.start()
    if not wait_for_http(f"{base}/healthz"):
        stack.stop()
        fail(f"the producer API did not come up on {base}")
    facts = {
        "api": base,
        "docs": f"{base}/docs",
        "database": db.describe_url(url),
        "broker": without_password(current.broker_url)
        if current.broker_url
        else f"filesystem ({current.broker_folder})",
        "producer_key": key,
    }
    if key is not None and not sys.stdout.isatty():
        # Standard output that is not a terminal usually ends up in a log file: say where the
        # key is kept rather than print it there.
        facts["producer_key"] = None
        facts["producer_key_file"] = str(current.producer_key_path.resolve())
    if as_json:
        click.echo(json.dumps(facts))
    else:
        click.echo(_banner(facts, current))
    sys.stdout.flush()
    sys.exit(stack.wait_until_stopped())


def _banner(facts: dict[str, str | None], current: Settings) -> str:
    where = "embedded default: no server needed" if current.embedded else "configured services"
    key = facts["producer_key"] or (
        f"$(cat {facts['producer_key_file']})"
        if facts.get("producer_key_file")
        else "<one of TOKENWARDEN_PRODUCER_KEYS>"
    )
    lines = [
        f"tokenwarden is running ({where})",
        f"  producer API  {facts['api']}   (OpenAPI docs: {facts['docs']})",
        f"  token store   {facts['database']}",
        f"  broker        {facts['broker']}",
    ]
    if facts["producer_key"]:
        lines.append(f"  producer key  {facts['producer_key']}")
    elif facts.get("producer_key_file"):
        lines.append(f"  producer key  in {facts['producer_key_file']}")
    lines += [
        "",
        "Send an event:",
        f"  curl -X POST {facts['api']}/v1/events -H 'Authorization: Bearer {key}' \\",
        "       -H 'Content-Type: application/json' \\",
        '       -d \'{"specversion":"1.0","id":"evt-1","source":"hr://example",'
        '"type":"membership.removed","data":{"org_id":"acme","user_id":"bob"}}\'',
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--keep", is_flag=True, help="Keep the throw-away home folder for a look.")
@click.option("--json", "as_json", is_flag=True, help="Print the steps as JSON.")
def demo(keep: bool, as_json: bool) -> None:
    """A narrated end-to-end story on a throw-away embedded home; exit 0 if every step held."""
    from tokenwarden.worker.ops.demo import run_demo

    held, steps, home = run_demo((lambda _line: None) if as_json else click.echo, keep=keep)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": held,
                    "home": str(home) if keep else None,
                    "steps": [vars(step) for step in steps],
                }
            )
        )
    else:
        click.echo("")
        echo_table(
            [(s.what, s.expected, s.seen, "ok" if s.held else "FAILED") for s in steps],
            ["step", "expected", "seen", ""],
        )
        click.echo("")
        click.echo("Every step held." if held else "Some steps did not hold.")
        if keep:
            click.echo(f"The demo's home is kept at {home}")
    sys.exit(0 if held else 1)


def register(group: click.Group) -> None:
    for each in (run, demo, worker, beat, api):
        group.add_command(each)
