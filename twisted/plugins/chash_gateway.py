from twisted.application.service import ServiceMaker

chash_gateway = ServiceMaker(
    "chash-gateway", "chashd.gateway.tap", "chashd gateway: Raft cluster map and key routing", "chash-gateway"
)
