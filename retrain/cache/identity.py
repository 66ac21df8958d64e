"""CacheIdentity: everything a cache file's vectors depend on, and the file name it gives."""

import dataclasses

# The main file's layout version, one of the identity attributes (``store``).
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What a cache file must have been built with to be used.

    Everything that changes the vectors is here: the backbone and its
    fingerprint, the inference ``engine`` ("keras" or "litert": their vectors
    differ in the last float32 bits; "litert-int8c<N>", the int8 engine with
    calibration set version N, differs more) and ``pixels``, the decoding and resizing
    settings (``decode.PIXEL_SETTINGS_ID``); ``dtype`` is the storage type.
    ``file_name`` puts all of them in the name, so a change opens another
    file and never mixes vectors.
    """

    backbone: str
    fingerprint: str
    feature_dim: int
    dtype: str
    engine: str
    pixels: str

    def attributes(self):
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "feature_dim": self.feature_dim,
            "dtype": self.dtype,
            "engine": self.engine,
            "pixels": self.pixels,
        }

    def file_name(self):
        """``<backbone>-<fingerprint[:16]>-<engine>-<pixels>-<dtype>.h5``."""
        return (
            f"{self.backbone}-{self.fingerprint[:16]}-{self.engine}-{self.pixels}-{self.dtype}.h5"
        )
