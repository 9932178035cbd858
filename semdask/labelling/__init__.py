"""Labelling: EDS-guided labels for training (the ``label`` arrow).

Multiscale pixel features (:mod:`.features`), EDS map registration (:mod:`.registration`),
scribbles and shapes (:mod:`.annotations`) and the random-forest labeller (:mod:`.label`).
"""
