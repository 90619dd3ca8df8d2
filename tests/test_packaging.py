"""What a wheel puts into site-packages: one import name, ``tokenwarden``, holding the folders
at the top of the checkout as its subpackages, so that a service that has its own ``config``
or ``tasks`` can install tokenwarden beside them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("config", "worker", "tasks", "producer", "migrations")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy of what a checkout holds, links kept as links, so that the build's
    # own files stay out of the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in (*FOLDERS, "tokenwarden"):
        shutil.copytree(
            ROOT / folder,
            source / folder,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    [built] = out.glob("tokenwarden-*.whl")
    return zipfile.ZipFile(built)


def test_a_wheel_adds_one_import_name(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"tokenwarden"}


def test_the_top_folders_are_its_subpackages_whole(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for folder in FOLDERS:
        for source in (ROOT / folder).rglob("*"):
            if source.suffix in {".py", ".mako", ".ini"} and "__pycache__" not in source.parts:
                relative = source.relative_to(ROOT).as_posix()
                assert f"tokenwarden/{relative}" in names, relative


def test_the_command_starts_from_the_one_name(wheel: zipfile.ZipFile) -> None:
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "tokenwarden = tokenwarden.worker.cli:main" in wheel.read(entry_points).decode()


def test_each_top_folder_is_reached_through_the_package() -> None:
    for folder in FOLDERS:
        link = ROOT / "tokenwarden" / folder
        assert link.is_symlink(), link
        assert link.resolve() == (ROOT / folder).resolve()


def test_the_mail_templates_ship_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for template in ("notice.txt", "notice.html"):
        assert f"tokenwarden/worker/runtime/templates/mail/{template}" in names
