"""Inference: the ``segment`` arrow.

Window grid and blend weights (:mod:`.windows`), mosaic-wide normalisation (:mod:`.normalise`),
predict kernels (:mod:`.predict`), the ``map_overlap`` graph (:mod:`.graph`), ensemble members
and test-time augmentation (:mod:`.ensemble`), pixel-size rescaling (:mod:`.rescale`), block
submission with a drain (:mod:`.batch`), the settings and their precedence (:mod:`.settings`),
the resolved run description (:mod:`.run`) and the entry point (:mod:`.segment`).
"""
