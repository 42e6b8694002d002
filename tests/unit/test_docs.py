"""The user's documentation matches the code: USAGE.md's option tables, routes and line-protocol commands, and
the OpenAPI document (valid, every real route documented, no documented route missing, real answers fit it).

``python -m tests.unit.test_docs`` rewrites the option tables of USAGE.md from ``chashd.config``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import chashd
from chashd.config import GatewayConfig, KVStoreConfig, OptionSpec, load_config, option_specs
from chashd.gateway.api import RingAPI, RingRoot
from chashd.gateway.clustermap import Outcome, OutcomeCode
from chashd.gateway.membership import Membership
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.statuspage import StatusPage
from chashd.gateway.testing import LocalRaft
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.text import RequestParser
from chashd.node import NodeState
from chashd.storage.memory import MemoryEngine
from chashd.web import KeyValueHTTP
from chashd.web._http import openapi_document

ROOT = Path(__file__).resolve().parents[2]
USAGE = ROOT / "USAGE.md"
DOCUMENT = ROOT / "chashd" / "openapi.json"
METHODS = ("get", "head", "put", "post", "delete", "patch", "options")


# -- option tables --------------------------------------------------------------------------------------


def _default(spec: OptionSpec) -> str:
    if spec.required:
        return "(required)"
    if spec.flag:
        return "off"
    if spec.default in (None, ()):
        return "(none)"
    if isinstance(spec.default, tuple):
        return "`" + ",".join(spec.default) + "`"
    return f"`{spec.default}`"


def render_options(config_class: type) -> str:
    """The Markdown table of a role's options: flag, environment variables, YAML key, default, meaning."""
    lines = ["| Flag | Environment | YAML key | Default | Meaning |", "|---|---|---|---|---|"]
    for spec in option_specs(config_class):
        flag = f"`{spec.cli}`" + (" (a flag)" if spec.flag else "")
        env = ", ".join(f"`{name}`" for name in spec.env)
        meaning = spec.help + (" (secret: hidden in logs)" if spec.secret else "")
        lines.append(f"| {flag} | {env} | `{spec.yaml_key}` | {_default(spec)} | {meaning} |")
    return "\n".join(lines)


_TABLES = {"gateway": GatewayConfig, "kvstore": KVStoreConfig}


def _section(role: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- options:{role} begin.*?-->)\n(.*?)\n?(<!-- options:{role} end -->)", re.S)


def rewrite_usage() -> None:
    """Regenerate the option tables in USAGE.md."""
    text = USAGE.read_text(encoding="utf-8")
    for role, config_class in _TABLES.items():
        table = render_options(config_class)

        def fill(match: re.Match[str], table: str = table) -> str:
            return f"{match[1]}\n{table}\n{match[3]}"

        text, count = _section(role).subn(fill, text)
        assert count == 1, f"USAGE.md has no options:{role} section"
    USAGE.write_text(text, encoding="utf-8")


class UsageTests:
    """USAGE.md against the code."""

    def test_option_tables(self) -> None:
        """Each role's option table is the one generated from chashd.config (run this module to regenerate)."""
        text = USAGE.read_text(encoding="utf-8")
        for role, config_class in _TABLES.items():
            match = _section(role).search(text)
            assert match, f"USAGE.md has no options:{role} section"
            assert match[2] == render_options(config_class), (
                f"USAGE.md's {role} options are stale: run .venv/bin/python -m tests.unit.test_docs"
            )

    def test_every_route(self) -> None:
        """Every HTTP route of both roles is described in USAGE.md as `METHOD /path`."""
        text = USAGE.read_text(encoding="utf-8")
        for path, method in klein_routes():
            if method == "head" and (path, "get") in klein_routes():
                continue
            assert f"`{method.upper()} {path}" in text, f"USAGE.md does not describe {method.upper()} {path}"

    def test_every_line_command(self) -> None:
        """Every command the line-protocol parser knows is in USAGE.md's command table."""
        text = USAGE.read_text(encoding="utf-8")
        for name in RequestParser()._dispatch:
            row = rf"^\|[^|\n]*`{name.decode()}[ `]"  # in the first cell of a table row
            assert re.search(row, text, re.M), f"USAGE.md does not list {name.decode()}"

    def test_headers_named(self) -> None:
        """The TTL and flags headers, ETag and the conditional headers are named in USAGE.md."""
        text = USAGE.read_text(encoding="utf-8")
        for header in ("X-Chash-TTL", "X-Chash-Flags", "X-Chash-Expires-At", "ETag", "If-Match", "If-None-Match"):
            assert header in text


# -- OpenAPI ----------------------------------------------------------------------------------------------


def _openapi_path(rule: str) -> str:
    """``/kv/<path:key>`` as OpenAPI writes it: ``/kv/{key}``."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def klein_routes(*apps: Any) -> set[tuple[str, str]]:
    """``(path, method)`` of every route of the Klein apps (default: both roles' surfaces)."""
    routes = set()
    for app in apps or (KeyValueHTTP.app, RingAPI.app, StatusPage.app):
        for rule in app.url_map.iter_rules():
            for method in rule.methods or ():
                routes.add((_openapi_path(rule.rule), method.lower()))
    return routes


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    """``(path, method)`` of every operation of an OpenAPI document."""
    return {(path, method) for path, item in document["paths"].items() for method in METHODS if method in item}


def _covers(routes: set[tuple[str, str]], document: dict[str, Any]) -> None:
    """Every route documented (HEAD may be covered by GET, as the document says), and nothing more."""
    ops = documented(document)
    missing = {(p, m) for p, m in routes if (p, m) not in ops and not (m == "head" and (p, "get") in ops)}
    assert not missing, f"routes without documentation: {sorted(missing)}"
    extra = {(p, m) for p, m in ops if (p, m) not in routes}
    assert not extra, f"documented operations without a route: {sorted(extra)}"


class ClockWithThreads(Clock):
    """A Clock whose ``callFromThread`` runs at once (LocalRaft reports on the caller's thread)."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class OpenAPITests(SynchronousTestCase):
    """chashd/openapi.json against the real Klein routes and answers of both roles."""

    def setUp(self) -> None:
        self.document = json.loads(DOCUMENT.read_text(encoding="utf-8"))
        self.clock = ClockWithThreads()
        self.config = load_config(GatewayConfig, {"gateway_id": "g1", "token": "t0k"}, environ={})
        self.membership = Membership(self.config, self.clock, self._raft)
        self.membership.startService()
        self.clock.advance(0.5)
        self.membership.register_node("kv-a", "127.0.0.1", 8080, 11212, 100, 1)
        self.clock.advance(0.5)
        self.api = RingAPI(self.membership, self.config, self.clock, status_extra=lambda: {"rebalancing": False})
        self.backend = LocalBackend(MemoryEngine(), "kv-a", self.clock, 1024)
        gateway_surface = KeyValueHTTP(self.backend, role="gateway")
        page = StatusPage(self.api.status_body, lambda: self.membership.view.ring, self.backend.stats, self.clock)
        self.gateway: Any = StubTreq(RingRoot(self.api.resource(), gateway_surface.resource(), page.resource()))
        self.kvstore: Any = StubTreq(KeyValueHTTP(self.backend, role="kvstore").resource())
        registry: Registry[Any] = Registry().with_resource(
            "urn:chashd", Resource.from_contents(self.document, default_specification=DRAFT202012)
        )
        self.registry = registry

    def _raft(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        return LocalRaft(settings, listener)

    def tearDown(self) -> None:
        self.api.close()
        self.membership.stopService()
        self.gateway.flush()
        self.backend.stop()

    def test_valid(self) -> None:
        """The document is a valid OpenAPI 3.1 document."""
        assert self.document["openapi"].startswith("3.1")
        validate(self.document)

    def test_routes_match(self) -> None:
        """Every route of both roles is documented and every documented operation has a route."""
        _covers(klein_routes(), self.document)

    def test_names_match(self) -> None:
        """The document's node states are NodeState's, and its admin results the codes of a change plus
        unchanged (the refusals are problems)."""
        schemas = self.document["components"]["schemas"]
        assert schemas["NodeState"]["enum"] == [s.value for s in NodeState]
        results = {c.value for c in OutcomeCode if Outcome(c, 0).changed} | {OutcomeCode.UNCHANGED.value}
        assert set(schemas["AdminResult"]["properties"]["result"]["enum"]) == results

    def test_roles(self) -> None:
        """The gateway-only paths are exactly the ring API's; each role serves its part, valid on its own."""
        gateway_only = {p for p, item in self.document["paths"].items() if item.get("x-chashd-roles") == ["gateway"]}
        assert gateway_only == {p for p, _ in klein_routes(RingAPI.app, StatusPage.app)}
        _covers(klein_routes(KeyValueHTTP.app), openapi_document("kvstore"))
        validate(openapi_document("kvstore"))
        _covers(klein_routes(), openapi_document("gateway"))

    def _ask(self, stub: Any, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        d = stub.request(method, "http://node" + path, **kw)
        stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(stub.content(response))
        headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body

    def test_served(self) -> None:
        """GET /openapi.json: the gateway serves every path, the kvstore only the shared ones; the version is
        the package's."""
        code, headers, body = self._ask(self.gateway, "GET", "/openapi.json")
        served = json.loads(body)
        assert code == 200 and headers["content-type"] == "application/json"
        assert set(served["paths"]) == set(self.document["paths"])
        assert served["info"]["version"] == chashd.__version__
        served = json.loads(self._ask(self.kvstore, "GET", "/openapi.json")[2])
        assert set(served["paths"]) == {p for p, _ in klein_routes(KeyValueHTTP.app)}

    def _operation(self, template: str, method: str) -> dict[str, Any]:
        return dict(self.document["paths"][template][method])

    def _conforms(self, template: str, method: str, code: int, headers: dict[str, str], body: bytes) -> None:
        """The status is documented for the operation; a JSON body fits the documented schema."""
        responses = self._operation(template, method)["responses"]
        assert str(code) in responses, f"{method.upper()} {template} answered {code}, not documented"
        content = responses[str(code)].get("content", {})
        media = headers.get("content-type", "").split(";")[0]
        if not body:
            return
        assert media in content, f"{method.upper()} {template} {code} answered {media}, documented {list(content)}"
        schema = content[media].get("schema", {})
        if media.endswith("json"):
            ref = schema.get("$ref", "").replace("#", "urn:chashd#")
            validator = Draft202012Validator({"$ref": ref} if ref else schema, registry=self.registry)
            validator.validate(json.loads(body))

    def test_answers_fit(self) -> None:
        """Real answers of the routes (successes and errors) have documented statuses and fit their schemas."""
        auth = {"Authorization": ["Bearer t0k"]}
        registration = json.dumps({"id": "kv-b", "host": "127.0.0.1", "port": 8081, "line_port": 11213}).encode()
        calls: list[tuple[Any, str, str, str, dict[str, Any]]] = [
            (self.gateway, "PUT", "/kv/a", "/kv/{key}", {"data": b"x", "headers": {"X-Chash-Flags": ["3"]}}),
            (self.gateway, "GET", "/kv/a", "/kv/{key}", {}),
            (self.gateway, "HEAD", "/kv/a", "/kv/{key}", {}),
            (self.gateway, "PUT", "/kv/a", "/kv/{key}", {"data": b"y", "headers": {"If-None-Match": ["*"]}}),
            (self.gateway, "PUT", "/kv/a", "/kv/{key}", {"data": b"y", "headers": {"X-Chash-TTL": ["soon"]}}),
            (self.gateway, "PUT", "/kv/big", "/kv/{key}", {"data": b"z" * 2000}),
            (self.gateway, "DELETE", "/kv/a", "/kv/{key}", {}),
            (self.gateway, "DELETE", "/kv/a", "/kv/{key}", {}),
            (self.gateway, "GET", "/kv/a", "/kv/{key}", {}),
            (self.gateway, "GET", "/kv/" + "k" * 251, "/kv/{key}", {}),
            (self.kvstore, "GET", "/health", "/health", {}),
            (self.gateway, "GET", "/ready", "/ready", {}),
            (self.kvstore, "GET", "/stats", "/stats", {}),
            (self.kvstore, "GET", "/metrics", "/metrics", {}),
            (self.gateway, "GET", "/ring", "/ring", {}),
            (self.gateway, "GET", "/ring?after=x", "/ring", {}),
            (self.gateway, "GET", "/ring/status", "/ring/status", {}),
            (self.gateway, "GET", "/ring/lookup/a", "/ring/lookup/{key}", {}),
            (self.gateway, "GET", "/ring/nodes", "/ring/nodes", {}),
            (self.gateway, "GET", "/ring/nodes/kv-a", "/ring/nodes/{node_id}", {}),
            (self.gateway, "GET", "/", "/", {}),
            (self.gateway, "GET", "/status/main", "/status/main", {}),
            (self.gateway, "GET", "/status/ring.svg", "/status/ring.svg", {}),
            (self.gateway, "GET", "/status/style.css", "/status/style.css", {}),
            (self.gateway, "GET", "/status/refresh.js", "/status/refresh.js", {}),
            (self.gateway, "GET", "/ring/nodes/nobody", "/ring/nodes/{node_id}", {}),
            (self.gateway, "POST", "/ring/nodes", "/ring/nodes", {"data": registration}),
            (self.gateway, "POST", "/ring/nodes", "/ring/nodes", {"data": registration, "headers": auth}),
            (self.gateway, "POST", "/ring/nodes", "/ring/nodes", {"data": b"[]", "headers": auth}),
            (self.gateway, "POST", "/ring/nodes/kv-b/drain", "/ring/nodes/{node_id}/drain", {"headers": auth}),
            (self.gateway, "DELETE", "/ring/nodes/kv-b", "/ring/nodes/{node_id}", {"headers": auth}),
            (self.gateway, "DELETE", "/ring/nodes/kv-b", "/ring/nodes/{node_id}", {"headers": auth}),
        ]
        seen = set()
        for stub, method, path, template, kw in calls:
            code, headers, body = self._ask(stub, method, path, **kw)
            self._conforms(template, method.lower(), code, headers, body)
            seen.add((method, template, code))
        # The calls above reach successes and errors alike.
        assert {("PUT", "/kv/{key}", 204), ("PUT", "/kv/{key}", 412), ("GET", "/kv/{key}", 404)} <= seen
        admin = {("POST", "/ring/nodes", 401), ("POST", "/ring/nodes", 201), ("DELETE", "/ring/nodes/{node_id}", 404)}
        assert admin <= seen

    def test_no_backend_is_503(self) -> None:
        """A surface without a backend answers 503 with Retry-After, as documented for /kv."""
        stub: Any = StubTreq(KeyValueHTTP(None, role="kvstore").resource())
        code, headers, body = self._ask(stub, "GET", "/kv/a")
        assert headers["retry-after"] == "1"
        self._conforms("/kv/{key}", "get", code, headers, body)


if __name__ == "__main__":
    rewrite_usage()
    sys.exit(0)


# -- layout -----------------------------------------------------------------------------------------------

README = ROOT / "README.md"
TESTS = ROOT / "tests"
_TEST_CASE_NAME = re.compile(r"# -\*- test-case-name: ([\w.,]+) -\*-")


def _modules() -> list[Path]:
    """Every module of the package but the packages' ``__init__.py``."""
    return sorted(p for p in (ROOT / "chashd").rglob("*.py") if p.name != "__init__.py")


def _tests_by_name(module: Path) -> list[Path]:
    """The test modules named after ``module``: ``test_<name>``, ``test_<package>_<name>`` (``test_kvstore_tap``)
    or, for a private module of a subpackage, ``test_<subpackage>`` (``chashd/client/_api.py``: ``test_client``)."""
    parts = module.relative_to(ROOT / "chashd").with_suffix("").parts
    names = {f"test_{parts[-1]}", f"test_{'_'.join(parts)}"}
    if len(parts) > 1:
        names.add(f"test_{parts[0]}")
    return [p for kind in ("unit", "integration") for p in (TESTS / kind).glob("test_*.py") if p.stem in names]


class LayoutTests:
    """Each module says where its tests are and README's Layout names it, so ``ls chashd/*/``, the module
    docstrings and the Layout section show the structure."""

    def test_every_module_has_tests(self) -> None:
        """A module has a test module named after it, or opens with a ``test-case-name`` line (Twisted's
        convention) naming test modules that exist."""
        missing = []
        for module in _modules():
            header = _TEST_CASE_NAME.match(module.read_text().split("\n", 1)[0])
            if header:
                named = header.group(1).split(",")
                absent = [n for n in named if not (ROOT / (n.replace(".", "/") + ".py")).is_file()]
                assert not absent, f"{module.relative_to(ROOT)} names test modules that do not exist: {absent}"
            elif not _tests_by_name(module):
                missing.append(str(module.relative_to(ROOT)))
        assert missing == []

    def test_layout_names_every_module(self) -> None:
        """README's Layout names every public module under its directory."""
        block = README.read_text().split("## Layout", 1)[1].split("```")[1]
        lines = block.splitlines()
        unnamed = []
        for module in _modules():
            if module.name.startswith("_"):
                continue  # described with its package
            directory = f"{module.parent.relative_to(ROOT)}/"
            named = (line.split("  ")[0].split() for line in lines if line.startswith(directory))
            if not any(module.name in {Path(word).name for word in words} for words in named):
                unnamed.append(str(module.relative_to(ROOT)))
        assert unnamed == []
