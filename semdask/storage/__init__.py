"""Storage: the only stage that opens stores.

OME-Zarr reading and shard-aligned writing (:mod:`.io`), OME-NGFF metadata (:mod:`.ome`),
multiscale pyramids (:mod:`.pyramid`), the per-block ledger (:mod:`.ledger`) and NGFF 0.4
export (:mod:`.export`). Imports nothing from the stages above it.
"""
