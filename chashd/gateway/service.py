"""The gateway: the cluster map, the router over it."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from chashd.config import GatewayConfig

__all__ = ["GatewayService"]


class GatewayService(MultiService):
    """Owns what a gateway is: its identity, its view of the cluster."""

    _log = Logger()

    def __init__(self, config: GatewayConfig, reactor: IReactorTime) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor

    def health(self) -> dict[str, Any]:
        """The body of ``GET /health``."""
        return {"role": "gateway", "id": self.config.gateway_id}
