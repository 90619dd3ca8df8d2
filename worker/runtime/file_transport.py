"""kombu's file-backed broker (the embedded default), with each message written atomically.

kombu's filesystem transport creates a message's file under its final name, then writes the
message into it. A consumer polling the folder in between takes the empty or half-written
file, cannot decode it, and its worker stops ("Unrecoverable error"); the message is gone
too. Here a message is written under a name no consumer looks at (``….msg.part``) and then
renamed to its final name: a rename within one folder is atomic, so a consumer sees a whole
message or none.

:func:`install` makes ``filesystem://`` mean this transport in the process; everything else
is kombu's.
"""

from __future__ import annotations

import os
import uuid
from contextlib import suppress
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import filesystem as kombu_filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

PARTIAL_SUFFIX = ".part"


class Channel(kombu_filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # The name kombu gives a message: consumers take them in this (time) order.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + PARTIAL_SUFFIX
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as error:
            with suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {name!r} to directory") from error


class Transport(kombu_filesystem.Transport):
    Channel = Channel


def install() -> None:
    """Make ``filesystem://`` broker URLs use :class:`Transport` in this process."""
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
