"""The kvstore role: a storage node of the ring."""

__all__: list[str] = []
