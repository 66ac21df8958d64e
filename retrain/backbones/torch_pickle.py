"""Read a legacy (pre-zip) PyTorch state-dict file with numpy only.

The file is a sequence of pickles: magic number, protocol version, system
info, the state dict, the list of storage keys; then, for each key in that
order, an int64 element count followed by the storage's raw little-endian
data. A pickle can name any Python callable, so the unpickler here resolves
only the few globals a state dict needs and refuses everything else before
anything is called.
"""

import collections
import hashlib
import io
import math
import pickle
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001


class _StorageType(collections.namedtuple("_StorageType", "name dtype")):
    """What the unpickler returns for torch.FloatStorage etc.: data, not code."""


_STORAGE_TYPES = {
    name: _StorageType(name, np.dtype(code))
    for name, code in [
        ("DoubleStorage", "<f8"),
        ("FloatStorage", "<f4"),
        ("HalfStorage", "<f2"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
    ]
}


class UnsafeWeightsFileError(RetrainError):
    """The file's pickle names a Python global a state dict never needs."""


class WeightsFileError(RetrainError):
    """The file is truncated, corrupted or not a legacy PyTorch state dict."""


class _Storage(collections.namedtuple("_Storage", "key dtype numel")):
    """A storage the state dict refers to; its data follows the pickles."""


class _TensorRef(collections.namedtuple("_TensorRef", "storage offset size stride")):
    """A strided view into a storage, as torch._utils._rebuild_tensor_v2 takes it."""


def _rebuild_tensor_v2(storage, offset, size, stride, *_requires_grad_and_hooks):
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor refers to {storage!r}, not to a storage")
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


# The pure-Python unpickler: the C one keeps its memo in an array as long as
# the largest memo index, so one corrupted BINPUT byte allocates gigabytes.
class _StateDictUnpickler(pickle._Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise UnsafeWeightsFileError(
            f"Refusing to load {self._path}: its pickle names the Python "
            f"global {module}.{name}, and a state dict needs only "
            "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and "
            "torch.<type>Storage (other globals let a crafted file run code). "
            f"Use weights from a source you trust. Received: global={module}.{name}"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def read_state_dict(path, sha256=None):
    """Read the tensors of a legacy PyTorch state-dict file.

    Args:
        path: `str` or `Path` of the `.pth` file.
        sha256: the file's expected hex sha256, or None not to check it.

    Returns:
        dict from state-dict key (e.g. "_conv_stem.weight") to a numpy array
        in PyTorch's logical shape and the storage's dtype (float32 for
        weights, int64 for `num_batches_tracked`), in the file's key order.

    Raises:
        UnsafeWeightsFileError: the pickle names a global other than
            collections.OrderedDict, torch._utils._rebuild_tensor_v2 or a
            torch.*Storage type; nothing in the file has been called.
        WeightsFileError: the file is missing, truncated or corrupted, or its
            sha256 is not `sha256`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WeightsFileError(f"Cannot read the weights file {path}: {error.strerror}.") from None
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is not None and actual != sha256:
        raise WeightsFileError(
            f"The weights file {path} is corrupted or not the released file: "
            f"its sha256 is {actual}, expected {sha256}. Reinstall the package "
            "that ships it."
        )
    try:
        return _parse(data, path)
    except UnsafeWeightsFileError:
        raise
    except Exception as error:  # any parse failure means a damaged file
        raise WeightsFileError(
            f"The weights file {path} is truncated or corrupted "
            f"({type(error).__name__}: {error}). Reinstall the package that "
            "ships it or get a fresh copy."
        ) from None


def _parse(data, path):
    stream = io.BytesIO(data)
    magic, protocol, _system_info = (_unpickle(stream, path) for _ in range(3))
    if (magic, protocol) != (_MAGIC_NUMBER, _PROTOCOL_VERSION):
        raise ValueError("not a legacy PyTorch file (wrong magic number)")
    tensors = _unpickle(stream, path)
    keys = _unpickle(stream, path)
    if not (
        isinstance(tensors, dict)
        and all(isinstance(k, str) for k in tensors)
        and all(isinstance(t, _TensorRef) for t in tensors.values())
    ):
        raise ValueError("the pickle is not a state dict of tensors")
    storages = {t.storage.key: t.storage for t in tensors.values()}
    arrays = _read_storages(data, stream.tell(), keys, storages)
    return {name: _strided_copy(t, arrays[t.storage.key]) for name, t in tensors.items()}


def _unpickle(stream, path):
    return _StateDictUnpickler(stream, path).load()


def _read_storages(data, position, keys, storages):
    """Map each storage key to a flat read-only array over `data`."""
    if not isinstance(keys, list) or sorted(keys) != sorted(storages):
        raise ValueError("the storage key list does not match the tensors")
    arrays = {}
    for key in keys:
        storage = storages[key]
        count = int.from_bytes(data[position : position + 8], "little", signed=True)
        end = position + 8 + count * storage.dtype.itemsize
        if count != storage.numel or end > len(data):
            raise ValueError(
                f"storage {key} should hold {storage.numel} elements; the "
                f"file has {max(0, (len(data) - position - 8) // storage.dtype.itemsize)} left"
            )
        arrays[key] = np.frombuffer(data, storage.dtype, count, position + 8)
        position = end
    if position != len(data):
        raise ValueError(f"{len(data) - position} unexpected bytes after the last storage")
    return arrays


def _strided_copy(tensor, flat):
    """Copy a (size, stride, offset) view of `flat` into a C-ordered array."""
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if not (
        len(size) == len(stride)
        and all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))
    ):
        raise ValueError(f"invalid tensor layout size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    # A state dict never repeats elements (stride 0), so a tensor with more
    # elements than its storage is damage, and would exhaust memory when copied.
    if last >= flat.size or math.prod(size) > flat.size:
        raise ValueError(f"tensor of size {size} reaches past its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=size,
        strides=[s * flat.itemsize for s in stride],
        writeable=False,
    )
    return view.copy()
