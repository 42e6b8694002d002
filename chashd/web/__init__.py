"""The HTTP surface both roles serve (Klein): /kv, /health, /ready, /stats, /metrics, problem+json errors."""

from chashd.web._client import http_client
from chashd.web._http import KeyValueHTTP, json_response, problem

__all__ = ["KeyValueHTTP", "http_client", "json_response", "problem"]
