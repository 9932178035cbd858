"""Storage: the only stage that opens stores.

OME-Zarr reading and shard-aligned writing (:mod:`.io`), OME-NGFF metadata (:mod:`.ome`),
multiscale pyramids (:mod:`.pyramid`), the per-block ledger (:mod:`.ledger`), its pyramid
checksums (:mod:`.levels`) and checked reads (:mod:`.integrity`), output
ownership (:mod:`.ownership`), the one-writer lock (:mod:`.lock`) and NGFF 0.4 export
(:mod:`.export`). Imports nothing from the stages above it.
"""
