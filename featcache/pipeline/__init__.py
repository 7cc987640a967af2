"""``featcache run`` and ``featcache demo``: pipelines of stages from one YAML file, skipped when unchanged, and the report.

Modules: ``config`` (the pipeline file, checked before anything runs), ``runner`` (stage keys, skipping,
progress lines), ``stages`` (what each stage reads, writes and does), ``report`` (Markdown and HTML).
"""
