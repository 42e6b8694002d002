"""The gateway role: the Raft-replicated cluster map and the key router."""

__all__: list[str] = []
