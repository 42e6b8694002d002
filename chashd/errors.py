"""Domain errors. Core code raises these; each adapter maps them to its wire in one place."""

from __future__ import annotations

__all__ = ["ChashdError", "ConfigError"]


class ChashdError(Exception):
    """Base of every error chashd raises on purpose."""


class ConfigError(ChashdError):
    """A configuration value is missing or wrong. The message is one line naming the option."""
