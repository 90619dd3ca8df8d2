"""Running the whole stack: the process supervisor behind ``tokenwarden run`` and the demo.

It may import anything below it (``worker.domain``, ``worker.runtime``, ``config``); nothing in
the domain or the runtime imports it.
"""
