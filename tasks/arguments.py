"""Checking a task message's arguments: the one validator of id lists the tasks share.

A message whose arguments are not what its task takes can never succeed, so it is not retried:
the task keeps it as a dead letter (:meth:`worker.runtime.tasking.CountedTask.dead_letter`)
with the reason this module gives.

Imports nothing of ours beyond the standard library: no runtime, no domain, never the API
(``producer``).
"""

from __future__ import annotations

from typing import Any


class BadArguments(ValueError):
    """The message's arguments are not the one list of ids its task takes."""

    def __init__(self, problem: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(problem)
        # What the dead letter keeps: the reason, and the message's arguments as they came.
        self.reason = f"bad arguments: {problem}"
        self.body: dict[str, Any] = {"args": args, "kwargs": kwargs}


def id_list(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    name: str,
    max_count: int,
    max_length: int,
    allow_nul: bool = False,
) -> list[str]:
    """The one argument ``name`` (positional or by keyword): a list of ids; else BadArguments.

    Each id is a string of 1 to ``max_length`` characters, at most ``max_count`` of them. An id
    with a NUL character is refused too unless ``allow_nul``: no stored id holds one, and
    Postgres cannot even compare a text with one, so a query would fail the run instead of
    the message being dead-lettered. (Notice delivery allows them and dead-letters each such
    id alone, so that the message's other notices are still delivered.)
    """

    def refuse(problem: str) -> BadArguments:
        return BadArguments(problem, args, kwargs)

    if kwargs.keys() - {name} or len(args) + len(kwargs) != 1:
        raise refuse(f"expected exactly one argument, {name}")
    value = args[0] if args else kwargs[name]
    if not isinstance(value, list):
        raise refuse(f"{name} must be a list, not {type(value).__name__}")
    if len(value) > max_count:
        raise refuse(f"{name} must be a list of at most {max_count} ids, not {len(value)}")
    one = name.removesuffix("s").replace("_", " ")  # "event_ids": "event id"
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= max_length:
            raise refuse(
                f"{name} must be a list of ids; each {one} must be a string of 1 to "
                f"{max_length} characters"
            )
        if not allow_nul and "\x00" in item:
            article = "an" if one[0] in "aeiou" else "a"
            raise refuse(f"{article} {one} cannot contain a NUL character")
    return value
