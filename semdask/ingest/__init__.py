"""Ingest: SEM images, vendor TIFFs and tile grids into OME-Zarr mosaics.

Image readers (:mod:`.readers`), vendor pixel sizes and declared data bars
(:mod:`.vendors`), data-bar cropping and detection (:mod:`.databar`), tile-grid
fusion (:mod:`.tilegrid`), label images (:mod:`.labelimport`) and the ``convert``
arrow (:mod:`.convert`).
"""
