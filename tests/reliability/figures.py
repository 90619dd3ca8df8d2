"""The figures each reliability test prints, gathered for one summary at the end of the run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every test's figures, in the order the tests finished; the conftest prints them at the end.
RECORDED: list[Figures] = []


@dataclass
class Figures:
    """Named counts of one test run: what was sent, applied, lost, doubled, injected."""

    test: str
    values: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def set(self, **values: Any) -> None:
        self.values.update(values)

    def add(self, name: str, amount: int = 1) -> None:
        self.values[name] = int(self.values.get(name, 0)) + amount

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def line(self) -> str:
        shown = " ".join(f"{key}={_shown(value)}" for key, value in self.values.items())
        return f"{self.test}: {shown}"

    def publish(self, folder: Path | None = None) -> None:
        """Print the figures now and keep them for the summary (and ``folder``, if given)."""
        self.values["seconds"] = round(time.monotonic() - self.started, 1)
        print(f"FIGURES {self.line()}")
        RECORDED.append(self)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "figures.jsonl"
            with path.open("a") as out:
                out.write(json.dumps({"test": self.test, **self.values}, default=str) + "\n")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)
