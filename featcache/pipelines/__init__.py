"""The pipelines featcache ships (data): ``featcache run NAME`` finds them by name, ``featcache demo`` runs ``demo``.

In a checkout they are also reachable as ``pipelines/NAME.yaml`` (a link to this folder).
"""
