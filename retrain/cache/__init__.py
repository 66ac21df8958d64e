"""The HDF5 bottleneck cache: one file per backbone fingerprint.

``BottleneckCache(..., engine=engines.choose(...)).update(image_list)``
extracts what is missing or changed with the engine handed in (resumable,
locked, crash-safe: see ``store``, ``journal`` and ``merge``);
``read(entries)`` returns the vectors. Nothing else reads or writes the
cache files; nothing here chooses an engine.

The same steps are public for extraction spread over processes or machines
(``--num_shards``, ``retrain.beam``): ``plan`` (which images need
extraction), ``extract_to_shard`` (a list of images into shard files, see
``shards``) and ``merge`` (finished shards into the cache); ``update`` is
merge -> plan -> extract into the journal -> merge.
"""

from retrain.cache.bottleneck_cache import BottleneckCache, CacheReport
from retrain.cache.plan import Plan

__all__ = ["BottleneckCache", "CacheReport", "Plan"]
