"""Analysis: quantification and evaluation of label maps (``analyze``, ``evaluate``).

Pooled counts and scores (:mod:`.metrics`, :mod:`.boundary`), connected components and
morphology (:mod:`.components`, :mod:`.morphology`), quantification (:mod:`.quantify`,
:mod:`.report`), evaluation (:mod:`.evaluate`, :mod:`.plots`), previews (:mod:`.preview`) and
robustness studies (:mod:`.robustness`).
"""
