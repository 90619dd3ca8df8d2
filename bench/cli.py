"""Command-line start-up: whole-process wall time of ``tokenwarden token verify``, ``token list``
and ``emit``, beside a bare ``python -c "import sqlalchemy, click, structlog, pydantic_settings"``.

A short command is mostly start-up: the interpreter, the libraries and ours (byte-compiled
first, as an installed package is: see :func:`byte_compile`). The limit is
the libraries such a command cannot do without, imported by a bare interpreter. Each round
runs the baseline and each command once, alternating, ``--repeats`` rounds a run; the value
of a run is a command's median over its rounds divided by the baseline's median. The
commands run on the embedded default in a temporary home (a store of a few tokens) with the
API of that home started once (``emit`` posts to it); the server options are accepted and
not used, since what is measured is start-up, not the store.

    .venv/bin/python bench/cli.py [--runs 3] [--repeats 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from bench import common
from tokenwarden.worker.ops.supervisor import free_port

NAME: Final = "cli"
TARGET: Final = 1.2
UNIT: Final = "s"
BASELINE: Final = ("-c", "import sqlalchemy, click, structlog, pydantic_settings")
# For context, not the ratio: what loading the token store's ORM models costs by itself,
# which every command that reads the store needs.
MODELS: Final = ("-c", "import click, structlog, tokenwarden.worker.domain.models")
# For context: the ORM models and the settings (which bring pydantic), with nothing run, and
# the interpreter's usual teardown at exit, which the baseline pays too. A short command
# skips that teardown (worker/cli/__init__.py ``leave``), which is why it can start, read the
# store and answer in less time than this takes to import and exit.
FLOOR: Final = (
    "-c",
    "import click, structlog, tokenwarden.config.settings, tokenwarden.worker.domain.models",
)
COMMANDS: Final = ("token verify", "token list", "emit")


def executable() -> list[str]:
    """The ``tokenwarden`` script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("tokenwarden")
    return [str(script)] if script.exists() else common.tokenwarden()


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=common.REPO, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        shown = " ".join(argv[-4:])
        raise common.BenchError(
            f"`{shown}` exited {done.returncode}: {done.stderr.decode()[-500:]}"
        )
    return seconds


def environment(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
    env.update(
        {
            "TOKENWARDEN_HOME": str(home),
            "TOKENWARDEN_API_PORT": str(port),
            "TOKENWARDEN_API_URL": f"http://127.0.0.1:{port}",
            "TOKENWARDEN_PRODUCER_KEYS": common.PRODUCER_KEY,
            "TOKENWARDEN_PRODUCER_KEY": common.PRODUCER_KEY,
        }
    )
    return env


def seed(env: dict[str, str]) -> str:
    """A member and a PAT of theirs; the PAT's text."""
    tokenwarden = executable()
    timed([*tokenwarden, "member", "add", "--org", "acme", "--user", "bob", "--role", "user"], env)
    pat = ("--kind", "personal", "--org", "acme", "--user", "bob", "--name", "laptop")
    expiry = (datetime.now(UTC) + timedelta(days=90)).date().isoformat()
    created = subprocess.run(
        [*tokenwarden, "token", "create", *pat, "--expires-at", expiry, "--json"],
        env=env,
        capture_output=True,
        check=True,
    )
    text: str = json.loads(created.stdout)["token"]
    return text


@contextmanager
def home_with_api() -> Iterator[tuple[dict[str, str], str]]:
    """A temporary home with a PAT in its store and its API answering; removed at the end."""
    home = Path(tempfile.mkdtemp(prefix="tw-bench-cli-"))
    port = free_port()
    env = environment(home, port)
    try:
        token = seed(env)
        api = common.Child("api", [*executable(), "api"], env, home / "api.log")
        with api:
            common.wait_for_http(f"http://127.0.0.1:{port}/healthz", api)
            yield env, token
    finally:
        shutil.rmtree(home, ignore_errors=True)


def argv_of(command: str, token: str) -> list[str]:
    if command == "token verify":
        return [*executable(), "token", "verify", "--token", token]
    if command == "token list":
        return [*executable(), "token", "list", "--org", "acme"]
    data = json.dumps({"org_id": "acme", "user_id": "carol", "role": "user"})
    return [*executable(), "emit", "membership.added", "--data", data, "--id", str(uuid.uuid4())]


def one_run(env: dict[str, str], token: str, repeats: int) -> dict[str, list[float]]:
    """Wall times per round: the baseline and each command, alternating."""
    times: dict[str, list[float]] = {
        name: [] for name in ("baseline", "models", "floor", *COMMANDS)
    }
    for _ in range(repeats):
        times["baseline"].append(timed(common.python(*BASELINE), env))
        times["models"].append(timed(common.python(*MODELS), env))
        times["floor"].append(timed(common.python(*FLOOR), env))
        for command in COMMANDS:
            times[command].append(timed(argv_of(command, token), env))
    return times


def options(argv: list[str] | None) -> argparse.Namespace:
    parsed = common.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parsed.add_argument("--repeats", type=int, default=None, help="rounds per run (5)")
    args = common.parse(parsed, argv)
    args.repeats = args.repeats or common.pick(args, 5, 2)
    return args


def byte_compile() -> None:
    """Our modules' bytecode, written as ``pip install`` writes it for an installed package.

    The libraries of the baseline were byte-compiled when they were installed; an editable
    install of ours is not, and where ``PYTHONDONTWRITEBYTECODE`` is set (as on these machines)
    every run would compile our modules again, which a user's installed command never does.
    """
    root = Path(__file__).resolve().parent.parent
    folders = [str(root / name) for name in ("config", "worker", "tasks", "producer")]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *folders],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    common.stop_on_sigterm()
    runs: list[dict[str, list[float]]] = []
    try:
        byte_compile()
        with home_with_api() as (env, token):
            timed(argv_of("token verify", token), env)  # warm the file cache
            for number in range(args.runs):
                runs.append(one_run(env, token, args.repeats))
                medians = {name: common.median(values) for name, values in runs[-1].items()}
                shown = ", ".join(f"{name} {value:.3f} s" for name, value in medians.items())
                print(f"  run {number + 1}: {shown}", file=sys.stderr, flush=True)
    except (common.BenchError, OSError, subprocess.CalledProcessError) as error:
        return common.failed(NAME, error, unit=UNIT, target=TARGET)
    return report(args, runs)


def report(args: argparse.Namespace, runs: list[dict[str, list[float]]]) -> int:
    ratios = {
        command: common.median(
            [common.median(run[command]) / common.median(run["baseline"]) for run in runs]
        )
        for command in COMMANDS
    }
    seconds = {name: common.median([common.median(run[name]) for run in runs]) for name in runs[0]}
    print(
        f"whole-process wall time, median of {args.repeats} round(s) per run, {args.runs} run(s), "
        "baseline and commands alternating"
    )
    bare = "python -c 'import sqlalchemy, click, structlog, pydantic_settings'"
    rows: list[list[Any]] = [[bare, seconds["baseline"], 1.0]]
    models = "python -c 'import click, structlog, tokenwarden.worker.domain.models' (context)"
    rows.append([models, seconds["models"], seconds["models"] / seconds["baseline"]])
    floor = "python -c 'import click, structlog, …settings, …models' (context)"
    rows.append([floor, seconds["floor"], seconds["floor"] / seconds["baseline"]])
    rows += [[f"tokenwarden {command}", seconds[command], ratios[command]] for command in COMMANDS]
    print(common.table(["command", "seconds", "ratio"], rows))
    slowest = max(COMMANDS, key=lambda command: ratios[command])
    print(f"slowest: {slowest}, ratio {ratios[slowest]:.3f} (target ≤ {TARGET})")
    outcome = common.result(
        NAME,
        value=seconds[slowest],
        baseline=seconds["baseline"],
        ratio=ratios[slowest],
        target=TARGET,
        ok=ratios[slowest] <= TARGET,
        unit=UNIT,
        slowest=slowest,
        models_s=common.rounded(seconds["models"], 3),
        floor_s=common.rounded(seconds["floor"], 3),
        floor_ratio=common.rounded(seconds["floor"] / seconds["baseline"], 3),
        ratios={command: common.rounded(value, 3) for command, value in ratios.items()},
        repeats=args.repeats,
        runs=args.runs,
        short=args.short,
    )
    return common.finish(outcome, short=args.short)


if __name__ == "__main__":
    sys.exit(main())
