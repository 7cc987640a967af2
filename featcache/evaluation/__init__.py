"""``featcache eval``: exact gallery search, the Market-1501 / VeRi-776 protocols, mAP, CMC, mINP."""
