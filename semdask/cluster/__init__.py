"""Cluster: the only stage that creates clusters and clients.

Named profiles (:mod:`.profiles`), connecting (:mod:`.connect`), worker plugins
(:mod:`.plugins`), driver-side monitoring (:mod:`.monitor`) and the dashboard page
(:mod:`.dashboard`).
"""
