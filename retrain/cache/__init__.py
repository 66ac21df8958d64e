"""The HDF5 bottleneck cache: one file per backbone fingerprint.

``BottleneckCache(...).update(image_list)`` extracts what is missing or
changed (resumable, locked, crash-safe: see ``store``); ``read(entries)``
returns the vectors. Nothing else reads or writes the cache files.
"""

from retrain.cache.bottleneck_cache import BottleneckCache, CacheReport

__all__ = ["BottleneckCache", "CacheReport"]
