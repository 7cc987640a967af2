"""``featcache distill``: a student trained from images against the cached MoE teacher (paper §3.1, §3.3, Eq. 10-16).

Modules: ``config`` (the options), ``students`` (architectures and the head), ``losses`` (Eq. 10-12, 16),
``data`` (the teacher's targets and the views' pixels, checked), ``inputs`` (the two input paths: workers and
device), ``replay`` (views replayed on the device), ``objective`` (L_total and its measurement), ``validate``
(the student on the teacher's held-out identities), ``train`` (the stage on the shared training loop),
``runner``, ``features`` (the ``student:`` model kind), ``load``, ``profile`` and ``export`` (ONNX).
"""
