"""Log observers for twistd's ``--logger`` option.

    twistd -n --logger chashd.logs.json_stdout chash-kvstore --node-id a

writes one JSON object a line to stdout (Twisted's own event serialization, as ``twist`` does when stdout
is not a terminal), which log collectors under Kubernetes or journald read field by field. Without
``--logger``, twistd writes its usual text lines.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver

__all__ = ["json_stdout"]


def json_stdout() -> ILogObserver:
    """An observer writing each event as one JSON object a line to stdout."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
