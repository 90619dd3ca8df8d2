"""What the suite leaves behind, kept for the secrets check that runs after every other test.

Each reliability test hands over the token texts it issued or reported, its processes'
logs, a dump of its database and every message its queue carried. The secrets test then
searches all of it for raw tokens: by the token pattern, and by each token's own text.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, inspect, text


@dataclass
class Evidence:
    root: Path
    tokens: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)

    def add_tokens(self, texts: Iterable[str]) -> None:
        self.tokens.update(texts)

    def _path(self, kind: str, label: str) -> Path:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "item"
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{self.counts[kind]:03d}-{safe}"

    def keep_file(self, kind: str, label: str, source: Path) -> None:
        if source.is_file():
            shutil.copyfile(source, self._path(kind, label))

    def keep_text(self, kind: str, label: str, content: str) -> None:
        self._path(kind, label).write_text(content)

    def keep_database(self, label: str, engine: Engine) -> None:
        self.keep_text("database", label, dump_database(engine))

    def files(self, kind: str | None = None) -> Iterator[Path]:
        base = self.root / kind if kind else self.root
        if base.exists():
            yield from sorted(path for path in base.rglob("*") if path.is_file())


def dump_database(engine: Engine) -> str:
    """Every row of every table, as text (what ``pg_dump --data-only`` would show)."""
    lines = []
    with engine.connect() as connection:
        for name in sorted(inspect(connection).get_table_names()):
            for row in connection.execute(text(f'SELECT * FROM "{name}"')):
                lines.append(f"{name}: {tuple(row)!r}")
    return "\n".join(lines)
