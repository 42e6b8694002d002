from twisted.application.service import ServiceMaker

chash_kvstore = ServiceMaker(
    "chash-kvstore", "chashd.kvstore.tap", "chashd kvstore: a storage node of the ring", "chash-kvstore"
)
