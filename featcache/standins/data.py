"""The stand-ins' pre-training set: synthetic pedestrians rendered in memory, other identities than any demo's."""

from __future__ import annotations

import numpy as np

from featcache.progress import progress
from featcache.synth_render import Person, Scene, render_person


def render_pretraining_set(ids: int, cams: int, per_id: int, seed: int, size: tuple[int, int],
                          quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), labels (N,)): ``per_id`` shots of each identity across daylight scenes.

    Seeded apart from ``featcache synth`` (its streams are ``[seed, 1|2|3, ...]``; these are ``[seed, 7|8|9, ...]``),
    so that even an equal seed gives other people and places.
    """
    h, w = size
    scenes = [Scene.sample(np.random.default_rng([seed, 7, c])) for c in range(cams)]
    images = np.empty((ids * per_id, h, w, 3), np.uint8)
    labels = np.repeat(np.arange(ids), per_id)
    rng = np.random.default_rng([seed, 9])
    for pid in progress(range(ids), desc="pretrain-standins: render", unit="id", disable=quiet):
        person = Person.sample(np.random.default_rng([seed, 8, pid]))
        for k in range(per_id):
            img = render_person(person, scenes[int(rng.integers(cams))], np.random.default_rng(rng.integers(2**31)), size=(w, h))
            images[pid * per_id + k] = np.asarray(img)
    return images, labels
