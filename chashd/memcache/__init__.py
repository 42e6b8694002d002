"""The memcached text protocol: a pure parser (text.py) and the Twisted protocol (protocol.py)."""

__all__: list[str] = []
