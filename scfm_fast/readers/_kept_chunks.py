"""The last chunk decoded whole for a read that ends inside it, kept per array for the read that follows.

Storage chunks rarely end where a read block does: a read ending inside chunk ``k`` is usually followed by
one starting there (consecutive blocks of a file), which then takes the rest without decoding the chunk
again. A hit needs the same stored bytes (compared: far cheaper than decoding), so a rewritten file is
never answered from a kept chunk. One chunk per array, for the latest :data:`MAX_KEPT` arrays: a worker
reads thousands of files in turn and must not keep one chunk of each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

#: arrays a cache keeps a chunk for (the most recently decoded ones)
MAX_KEPT = 8


def kept_chunk(cache: dict[Hashable, tuple[int, bytes, np.ndarray]], array: Hashable, k: int, raw: bytes,
               decode: Callable[[], np.ndarray]) -> np.ndarray:
    """Chunk ``k`` of ``array`` decoded whole: the one ``cache`` keeps when it is this chunk with the same
    stored bytes ``raw``, else ``decode()``, then kept in its place."""
    kept = cache.get(array)
    if kept is None or kept[0] != k or kept[1] != raw:
        kept = (k, raw, decode())
        cache.pop(array, None)
        cache[array] = kept  # the newest last
        while len(cache) > MAX_KEPT:
            cache.pop(next(iter(cache)))
    return kept[2]
