"""The chash command's parsing, input formats and output helpers (no network: see
tests/integration/test_cli.py for every subcommand against a real cluster)."""

from __future__ import annotations

import io
import json

import pytest

from chashd import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class UsageTests:
    """Bad arguments exit 2 with one line on stderr."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["get"],
            ["put", "k"],
            ["frobnicate"],
            ["load"],
            ["load", "f", "--count", "3"],
            ["nodes", "drain"],
            ["--timeout", "soon", "ring"],
            ["cluster"],
        ],
    )
    def test_bad_arguments(self, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
        """Each bad command line exits 2 and prints one line naming the command and its --help."""
        code, out, err = run(capsys, *argv)
        assert code == cli.EXIT_USAGE
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("chash") and "error:" in lines[0] and "--help" in lines[0]

    def test_json_after_node_action(self) -> None:
        """--json may come before or after a node action, and is off unless given."""
        parse = cli.build_parser().parse_args
        assert parse(["nodes", "drain", "x", "--json"]).json is True
        assert parse(["nodes", "--json", "remove", "x"]).json is True
        assert parse(["nodes", "drain", "x"]).json is False

    def test_no_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """chash alone prints the help on stderr and exits 2."""
        code, out, err = run(capsys)
        assert code == cli.EXIT_USAGE and "COMMAND" in err and out == ""

    def test_bad_gateway_url(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A --gateway that is not an http URL is a usage error, found before any request."""
        code, _, err = run(capsys, "--gateway", "ftp://x:1", "get", "k")
        assert code == cli.EXIT_USAGE
        assert err.strip() == "chash get: error: 'ftp://x:1' is not a gateway URL such as http://127.0.0.1:8000"

    def test_bad_key(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A key with a space is refused by the client before sending: exit 2, one line."""
        code, _, err = run(capsys, "--gateway", "127.0.0.1:9", "put", "a b", "v")
        assert code == cli.EXIT_USAGE
        assert err.strip() == "chash: bad key 'a b': key holds a space or a control character"

    def test_help_lists_every_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help names every subcommand the brief asks for, and the exit codes."""
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["--help"])
        text = capsys.readouterr().out
        for command in ("put", "get", "delete", "lookup", "ring", "status", "nodes", "load", "cluster"):
            assert command in text
        assert "CHASH_GATEWAY" in text and "3 server or network error" in text


class LoadInputTests:
    """What chash load reads."""

    def test_text_lines(self) -> None:
        """'KEY VALUE' splits at the first space or tab; the value keeps its other spaces; blank lines skip."""
        data = io.BytesIO(b"a 1\nb\thello world\n\nc\n d\r\n")
        entries = list(cli._entries_from_lines(data, "f", "text", 0, 5))
        assert [(e.key, e.value, e.where) for e in entries] == [
            ("a", b"1", "f:1"),
            ("b", b"hello world", "f:2"),
            ("c", b"", "f:4"),
            ("", b"d", "f:5"),
        ]
        assert {e.flags for e in entries} == {5}

    def test_jsonl(self) -> None:
        """JSON lines carry key, value and optionally their own ttl and flags."""
        data = io.BytesIO(b'{"key": "a", "value": "x", "ttl": 9, "flags": 2}\n{"key": "b"}\n')
        entries = list(cli._entries_from_lines(data, "f", "jsonl", 0, 1))
        assert [(e.key, e.value, e.ttl, e.flags) for e in entries] == [("a", b"x", 9, 2), ("b", b"", 0, 1)]

    def test_bad_jsonl(self) -> None:
        """A line that is not such an object is a usage error naming the file and line."""
        with pytest.raises(cli._Usage, match="f:2"):
            list(cli._entries_from_lines(io.BytesIO(b'{"key": "a"}\n[1]\n'), "f", "jsonl", 0, 0))

    def test_generated(self) -> None:
        """--count N makes N keys PREFIXi with values of --size bytes."""
        entries = list(cli._generated(3, "p:", 10, 0, 0))
        assert [e.key for e in entries] == ["p:0", "p:1", "p:2"]
        assert all(len(e.value) == 10 for e in entries)
        assert entries[1].value == b"p:1:p:1:p:"


class OutputTests:
    """Tables and the rows of chash ring."""

    def test_table(self) -> None:
        """Columns are padded to the widest cell; numbers right-aligned; None shows as '-'."""
        text = cli._table(["NODE", "KEYS"], [["a", 5], ["longer", None]], right=(1,))
        assert text.splitlines() == ["NODE    KEYS", "a          5", "longer     -"]

    def test_ring_rows(self) -> None:
        """Shares come from the ring JSON (HashRing.from_dict); keys and state from the status; a leaving
        node out of the ring has share 0."""
        ring = {
            "algorithm": "ketama-md5",
            "epoch": 4,
            "points_per_node": 160,
            "nodes": [{"id": "a", "weight": 100}, {"id": "b", "weight": 300}],
            "leaving": [{"id": "c", "weight": 100, "state": "leaving"}],
        }
        status = {"nodes": [{"id": "a", "state": "up", "weight": 100, "keys": 10}]}
        rows = {r["id"]: r for r in cli._ring_rows(ring, status)}
        assert set(rows) == {"a", "b", "c"}
        assert rows["a"]["keys"] == 10 and rows["a"]["state"] == "up"
        assert 0.2 < rows["a"]["share"] < 0.3 and 0.7 < rows["b"]["share"] < 0.8
        assert rows["c"]["share"] == 0.0
        json.dumps(rows)

    def test_progress_text(self) -> None:
        """A handoff report shows its scalar fields in words; nothing shows as '-'."""
        report = {"running": True, "arcs_total": 8, "arcs_done": 3, "records_sent": 12, "pending": 4, "synced_epoch": 7}
        assert cli._progress_text(report) == "moving, arcs 3/8, sent 12, pending 4, synced epoch 7"
        assert cli._progress_text({"phase": "x", "arcs": [1]}) == "phase x"
        assert cli._progress_text(None) == "-"


class StatusTextTests:
    """What ``chash status`` says of the leader."""

    def test_leader_text(self) -> None:
        """The leader when the gateway names one; none, with the last one known, when its map is not current
        (a follower cut off from the others); none when it knows no leader at all."""
        assert cli._leader_text({"leader": "g1", "last_leader": "g1"}) == "g1"
        cut = cli._leader_text({"leader": None, "last_leader": "g2", "map_current": False})
        assert cut.startswith("none (") and "last one known is g2" in cut
        assert cli._leader_text({"leader": None, "last_leader": None}) == "none (no Raft quorum)"
        assert cli._leader_text({"leader": None}) == "none (no Raft quorum)"
