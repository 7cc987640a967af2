"""``featcache embed``: the features of any image folder, or of a dataset's splits, from a trained student, a trained
teacher or a backbone preset, written as a feature cache by extraction's own reader, mapper and writer."""
