"""``featcache distill``: a student trained from images against the cached MoE teacher (paper §3.1, §3.3, Eq. 10-16).

Modules: ``config`` (the options), ``students`` (architectures and the head),
``losses`` (Eq. 10-12, 16), ``data`` (teacher targets, maps and view pixels),
``train`` (the loop), ``runner``,
``features`` (the ``student:`` model kind), ``profile`` and ``export`` (ONNX).
"""
