"""The sections of ``benchmarks/gpu_check``: extraction, evaluation and training, each timed on the GPU (or checked on
the CPU with ``--cpu``). ``gpu_check.py`` holds the table of sections and runs them."""
