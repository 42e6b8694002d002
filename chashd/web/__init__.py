"""The HTTP surface both roles serve (Klein): /kv, /health, /ready, /stats, /metrics, problem+json errors."""

from chashd.web._http import (
    Forbidden,
    KeyPathConverter,
    KeyValueHTTP,
    Unauthorized,
    check_bearer,
    error_problem,
    json_response,
    problem,
    routing_problem,
    undecodable_path,
)
from chashd.web._limits import LimitedSite

__all__ = [
    "Forbidden",
    "KeyPathConverter",
    "KeyValueHTTP",
    "LimitedSite",
    "Unauthorized",
    "check_bearer",
    "error_problem",
    "json_response",
    "problem",
    "routing_problem",
    "undecodable_path",
]
