"""``tokenwarden demo`` tells its story end to end and exits 0 only when every step held."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import TOKENWARDEN, clean_env


@pytest.mark.slow
def test_the_demo_holds_every_step(tmp_path: object) -> None:
    done = subprocess.run(
        [str(TOKENWARDEN), "demo", "--json"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=str(tmp_path),
        timeout=180,
        check=False,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    failed = [step for step in result["steps"] if not step["held"]]
    assert (done.returncode, failed) == (0, []), done.stderr[-3000:]
    assert result["ok"] is True
    seen = {step["what"]: step["seen"] for step in result["steps"]}
    assert seen["bob's acme PAT"] == "refused (revoked)"
    assert seen["acme's AAT (bob created it, but it belongs to the app)"] == "usable"
    assert seen["GitHub is told it was a real token"] == "true_positive"
    assert seen["the leaked AAT"] == "refused (revoked)"
