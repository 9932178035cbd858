"""Synthetic data: SOC electrode microstructures, SEM image formation and the demo.

Phase layouts (:mod:`.microstructure`), synthetic SEM images and EDS maps (:mod:`.sem`) and
the ``demo`` command (:mod:`.demo`).
"""
