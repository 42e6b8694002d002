"""How both daemons write their log: text lines (twistd's default) or one JSON object a line.

``--log-format json`` (``CHASHD_LOG_FORMAT=json``) makes the daemon's root service hand twistd a
``JSONLineObserver`` on stdout: twistd's ``AppLogger`` uses an ``ILogObserver`` component of the
application when ``--logger`` is not given, the way a ``.tac`` file customizes logging. Each line holds

    time       the event's time, RFC 3339 in UTC with milliseconds ("2024-05-01T12:00:00.123Z")
    level      debug, info, warn, error or critical
    system     the event's log_system when it has one (twisted.web, legacy log.msg), else its namespace
    namespace  the logger's namespace (the module and class: "chashd.daemon.ListenService")
    text       the event rendered as the text log shows it
    traceback  with a logged failure only
and the event's own structured fields (``node_id``, ``epoch`` ...), values that JSON cannot hold as their
``str()``. A field named like one of the keys above is written with ``_field`` appended.

``twistd --logger chashd.logs.json_stdout`` gives the same lines for any twistd plugin.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.components import Componentized
from zope.interface import implementer

__all__ = ["LOG_FORMATS", "JSONLineObserver", "event_fields", "json_stdout", "with_log_format"]

LOG_FORMATS = ("text", "json")

_OWN_KEYS = frozenset({"time", "level", "system", "namespace", "text", "traceback"})
#: Keys of legacy ``twisted.python.log`` events (``log.msg``) that the log_* fields already say.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "why", "failure", "time", "system"})


def _iso_time(seconds: float) -> str:
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def event_fields(event: LogEvent) -> dict[str, Any]:
    """The JSON object written for ``event``."""
    level = event.get("log_level")
    namespace = event.get("log_namespace", "")
    fields: dict[str, Any] = {
        "time": _iso_time(event.get("log_time") or time.time()),
        "level": getattr(level, "name", "info"),
        "system": event.get("log_system") or namespace or "-",
        "namespace": namespace,
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            fields["traceback"] = failure.getTraceback()
        except Exception:  # a broken failure must not lose the line
            fields["traceback"] = repr(failure)
    legacy = "isError" in event and "message" in event
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_KEYS):
            continue
        fields[f"{key}_field" if key in _OWN_KEYS else key] = _jsonable(value)
    return fields


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each log event to ``stream`` as one JSON object a line (see the module docstring)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        self._stream.write(json.dumps(event_fields(event), ensure_ascii=False) + "\n")
        self._stream.flush()


def json_stdout() -> ILogObserver:
    """For ``twistd --logger chashd.logs.json_stdout``: JSON lines on stdout."""
    return JSONLineObserver(sys.stdout)


class _JSONLogRoot(MultiService):
    """A daemon's root that makes twistd log JSON lines: once attached to the application, it sets the
    application's ``ILogObserver`` component, which twistd's ``AppLogger`` uses unless ``--logger`` is given."""

    def setServiceParent(self, parent: Any) -> Any:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, json_stdout())
        return super().setServiceParent(parent)


def with_log_format(root: IService, log_format: str) -> IService:
    """``root`` itself for text logs; for ``json``, ``root`` under a parent that gives twistd the JSON observer."""
    if log_format != "json":
        return root
    parent = _JSONLogRoot()
    root.setServiceParent(parent)
    return parent
