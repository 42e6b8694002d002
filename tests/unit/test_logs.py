"""JSON log lines (chashd.logs): the fields of each line, and how a daemon's root hands twistd the observer."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.application.service import Application, MultiService
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.logger._legacy import publishToNewObserver  # what twisted.python.log does with a legacy message
from twisted.python.log import textFromEventDict
from twisted.trial.unittest import SynchronousTestCase

from chashd.logs import JSONLineObserver, with_log_format


class _Thing:
    def __str__(self) -> str:
        return "a thing"


def _lines(emit: Any) -> list[dict[str, Any]]:
    stream = io.StringIO()
    emit(Logger(namespace="chashd.test.Emitter", observer=JSONLineObserver(stream)))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class JSONLineObserverTests(SynchronousTestCase):
    """Each event is one JSON object on one line with time, level, system, text and its own fields."""

    def test_fields(self) -> None:
        """The text is the rendered format; the structured fields are there as values."""
        (line,) = _lines(lambda log: log.info("node {node_id} joined at epoch {epoch}", node_id="kv-a", epoch=7))
        assert line["text"] == "node kv-a joined at epoch 7"
        assert line["level"] == "info"
        assert line["namespace"] == "chashd.test.Emitter" and line["system"] == "chashd.test.Emitter"
        assert line["node_id"] == "kv-a" and line["epoch"] == 7
        assert line["time"].endswith("Z") and line["time"][10] == "T" and len(line["time"]) == 24
        assert not any(key.startswith("log_") for key in line)

    def test_one_line_per_event(self) -> None:
        """A newline inside a field stays inside its JSON string: one event, one line."""
        stream = io.StringIO()
        log = Logger(namespace="x", observer=JSONLineObserver(stream))
        log.warn("two\nlines {value}", value="a\nb")
        log.error("third")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2
        assert json.loads(lines[0])["value"] == "a\nb" and json.loads(lines[0])["level"] == "warn"
        assert json.loads(lines[1])["level"] == "error"

    def test_values_json_cannot_hold(self) -> None:
        """Objects are written as their str(), bytes decoded, tuples as lists; nothing is lost or raises."""
        (line,) = _lines(lambda log: log.info("x", thing=_Thing(), raw=b"k\xff", pair=(1, _Thing())))
        assert line["thing"] == "a thing"
        assert line["raw"] == "k\\xff"
        assert line["pair"] == [1, "a thing"]

    def test_field_named_like_a_key(self) -> None:
        """A structured field called ``time`` or ``text`` does not hide the line's own keys."""
        (line,) = _lines(lambda log: log.info("{text}", text="high", time=3))
        assert line["text"] == "high" and line["text_field"] == "high" and line["time_field"] == 3
        assert line["time"].endswith("Z")

    def test_failure(self) -> None:
        """A logged failure carries its traceback and its level is critical."""

        def emit(log: Logger) -> None:
            try:
                raise ValueError("broken value")
            except ValueError:
                log.failure("handling {what}", what="a request")

        (line,) = _lines(emit)
        assert line["level"] == "critical" and line["text"] == "handling a request"
        assert "ValueError: broken value" in line["traceback"]

    def test_legacy_event(self) -> None:
        """A twisted.python.log message (as twistd and twisted.web still write) has its system and text."""
        stream = io.StringIO()
        event = {"message": ("Server Shut Down.",), "isError": 0, "system": "-", "time": 1700000000.25}
        publishToNewObserver(JSONLineObserver(stream), event, textFromEventDict)
        line = json.loads(stream.getvalue())
        assert line["text"] == "Server Shut Down." and line["system"] == "-"
        assert line["time"] == "2023-11-14T22:13:20.250Z"
        assert "message" not in line and "isError" not in line


class LogFormatRootTests(SynchronousTestCase):
    """``with_log_format`` gives twistd's application the JSON observer only when asked."""

    def test_text_is_the_root_itself(self) -> None:
        """The default text format changes nothing: twistd keeps its own observer."""
        root = MultiService()
        assert with_log_format(root, "text") is root
        application = Application("chash-kvstore")
        root.setServiceParent(application)
        assert application.getComponent(ILogObserver, None) is None

    def test_json_sets_the_observer(self) -> None:
        """With json, the service twistd attaches to its application sets a JSONLineObserver component,
        and the daemon's own root runs under it."""
        root = MultiService()
        wrapped = with_log_format(root, "json")
        application = Application("chash-kvstore")
        wrapped.setServiceParent(application)
        assert isinstance(application.getComponent(ILogObserver), JSONLineObserver)
        assert root.parent is wrapped
        wrapped.startService()
        assert root.running
        wrapped.stopService()
        assert not root.running

    def test_level_names(self) -> None:
        """Every level has the name the line shows."""
        assert [level.name for level in LogLevel.iterconstants()] == ["debug", "info", "warn", "error", "critical"]
