"""Where the time of loading an EfficientNet-Lite backbone goes.

    python benchmarks/backbone_load.py [NAME ...] [--repeats N]

Prints medians over N repeats, per backbone: a cold load (empty conversion
cache, in a fresh temporary RETRAIN_HOME each time), a warm load, and the
parts of a warm load: reading the converted-weights cache, building the
Keras graph, assigning the weights; plus what reading and converting the
.pth directly would cost instead of the cache read.
"""

import argparse
import os
import statistics
import tempfile
import time

from retrain import backbones
from retrain.backbones import conversion_cache, efficientnet_lite, torch_pickle


def median_seconds(function, repeats, setup=lambda: None):
    times = []
    for _ in range(repeats):
        setup()
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name, repeats, scratch):
    """Seconds per step; every cache goes to a new folder under `scratch`."""
    spec = backbones.get(name)
    variant = efficientnet_lite.VARIANTS[name]
    sha256 = spec.weights_digest.removeprefix("sha256:")
    homes = iter(range(repeats))
    cold = median_seconds(
        lambda: backbones.load(name),
        repeats,
        setup=lambda: os.environ.update(RETRAIN_HOME=f"{scratch}/{name}{next(homes)}"),
    )
    warm = median_seconds(lambda: backbones.load(name), repeats)
    arrays = conversion_cache.load_or_convert(name, sha256, convert=None)
    figures = {
        "cold load": cold,
        "warm load": warm,
        "  cache read + digest": median_seconds(
            lambda: conversion_cache.load_or_convert(name, sha256, convert=None), repeats
        ),
        "  graph build": median_seconds(
            lambda: efficientnet_lite.build(name, spec.input_size, variant, arrays, False),
            repeats,
        ),
    }
    model = efficientnet_lite.build(name, spec.input_size, variant, arrays, False)
    figures["  weight assignment"] = median_seconds(
        lambda: [v.assign(arrays[v.path]) for v in model.weights], repeats
    )
    path = efficientnet_lite.source_path(name)
    figures[".pth read + sha256 + convert (instead of the cache)"] = median_seconds(
        lambda: efficientnet_lite.convert(
            torch_pickle.read_state_dict(path, sha256=sha256), variant, path
        ),
        repeats,
    )
    return figures


def main():
    lites = list(efficientnet_lite.VARIANTS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"any of {lites}; default: {lites[0]}")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(lites))
    if unknown:
        parser.error(f"not an EfficientNet-Lite backbone: {unknown}; choose from {lites}")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["RETRAIN_HOME"] = f"{scratch}/warm-up"
        backbones.load(lites[0])  # the first graph in a process pays TF's set-up
        for name in args.names or lites[:1]:
            print(f"{name} (median of {args.repeats}):")
            for label, seconds in measure(name, args.repeats, scratch).items():
                print(f"  {label:<52} {seconds * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
