"""Ingest: SEM images, vendor TIFFs and tile grids into OME-Zarr mosaics.

Vendor readers and pixel sizes (:mod:`.readers`), tile-grid fusion (:mod:`.tilegrid`),
label images (:mod:`.labelimport`) and the ``convert`` arrow (:mod:`.convert`).
"""
