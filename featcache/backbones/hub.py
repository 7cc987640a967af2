"""Finding published weights: the local Hugging Face cache first, the network only if it answers at once.

Without network, ``huggingface_hub`` retries each download for about a
minute while printing warnings. Before any download we look in the local
cache and, when the weights are not there, check in a few seconds whether
the hub can be reached at all (``HF_HUB_OFFLINE=1`` skips the check), so a
missing checkpoint fails at once with a message that says where we looked.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


def hub_offline_reason(endpoint: str | None = None) -> str | None:
    """Why the hub cannot be reached now (None when it answers)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint or constants.ENDPOINT)
    return probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80))


def probe(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be reached within PROBE_TIMEOUT_S (None when it answers, or behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy only a real request can tell: let the download try
    result: list[str | None] = []

    def attempt() -> None:  # in a thread: the name lookup has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port} cannot be reached ({exc.strerror or type(exc).__name__})")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:.0f} s"


def cached_file(repo_id: str, filenames: list[str]) -> Path | None:
    """The first of ``filenames`` present in the local Hugging Face cache for ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


#: how to supply local weights, per family (the --weights value each family reads)
SUPPLY = {
    "open_clip": "PATH (an open_clip checkpoint file, .safetensors/.bin/.pt, or a directory holding one)",
    "align": "DIR (a directory saved by save_pretrained, holding config.json and model.safetensors)",
}


def check_published_weights(preset) -> None:
    """Refuse at once a published preset whose weights are neither in the local cache nor downloadable now."""
    from featcache.backbones.base import WeightsNotFoundError

    if not preset.hub_repo:
        return
    from huggingface_hub import constants

    if cached_file(preset.hub_repo, list(preset.hub_files)) is not None:
        return
    reason = hub_offline_reason()
    if reason is None:
        return  # the hub answers: the family's loader downloads them
    raise WeightsNotFoundError(
        f"{preset.name}: weights not found. Looked in the Hugging Face cache {constants.HF_HUB_CACHE} for "
        f"{preset.hub_repo} ({' or '.join(preset.hub_files)}); not downloaded: {reason}. "
        f"Supply them with --weights {preset.name}={SUPPLY.get(preset.family, 'PATH')}, "
        "or point HF_HOME at a cache that holds them."
    )
