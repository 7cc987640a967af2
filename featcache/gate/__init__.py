"""``featcache train-gate``: expert adapters and the mixture-of-experts gate (Eq. 6-9), trained from the cache."""
