"""Storage engines behind one synchronous interface."""

__all__: list[str] = []
