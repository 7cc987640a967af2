"""``featcache distill`` (in progress): the student distilled from the cached MoE teacher. So far: the losses."""
