"""Command line: flags + YAML -> one Config -> run.run. The only place that parses argv.

    python -m retrain --image_dir flower_photos [--config run.yaml] [flags]

Precedence: Config defaults < the preset's values (`--preset` or YAML `preset:`,
see retrain.presets) < the YAML file < flags given on the command line.
Usage errors and bad input print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import fields

from retrain import backbones, extras, messages, presets
from retrain import config as config_lib
from retrain.arguments import OneLineErrorParser, add_version, exit_without_teardown
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

logger = logging.getLogger(__name__)

HELP = {
    "image_dir": "folder with one sub-folder of images per class",
    "preset": "fast: the head on cached vectors, in seconds; best: fine-tune the whole "
    "backbone with the recipe of docs/training-paths.md (flags and the YAML file override it)",
    "bottleneck_dir": "folder of the HDF5 bottleneck caches, one file per backbone",
    "architecture": f"frozen ImageNet backbone, one of: {', '.join(backbones.names())}",
    "backbone_weights": "local weights file for a Keras-application backbone (offline use)",
    "bottleneck_dtype": "storage type of cached vectors: float16 or float32",
    "extraction_batch_size": "images per forward pass when filling the cache",
    "engine": "inference engine for extraction: auto (LiteRT on CPU, Keras on a GPU), "
    "keras, litert or litert-int8 (the backbone quantized to int8: faster, vectors "
    "slightly off; falls back to litert)",
    "cache_only": "build or update the bottleneck cache, then stop",
    "num_shards": "with --cache_only: split extraction into this many parts, one process each",
    "shard_index": "with --num_shards: the part this process extracts, 0 to NUM_SHARDS-1",
    "output_dir": "folder for everything a run writes",
    "output_graph": "where to save the exported model (default OUTPUT_DIR/model.keras)",
    "output_labels": "where to save the labels (default OUTPUT_DIR/labels.txt)",
    "saved_model_dir": "also export a SavedModel whose serving_default signature takes encoded "
    "image bytes (JPEG, PNG) to this folder",
    "tflite": f"also export TFLite models OUTPUT_DIR/model_<KIND>.tflite, KIND in "
    f"{', '.join(config_lib.TFLITE_KINDS)}",
    "onnx": "also export OUTPUT_DIR/model.onnx (float32, labels in its metadata), checked with "
    f"ONNX Runtime against the Keras model; needs {extras.ONNX_INSTALL}",
    "summaries_dir": "TensorBoard log folder (default OUTPUT_DIR/summaries)",
    "how_many_training_steps": "most optimizer steps for the new layer (early stopping may end sooner)",
    "learning_rate": "learning rate of the new layer",
    "train_batch_size": "bottlenecks per training step",
    "validation_batch_size": "bottlenecks per validation pass, -1 for the whole validation set "
    "(at most 50,000: a random sample of a larger one)",
    "test_batch_size": "bottlenecks per test batch, -1 for the whole test set",
    "eval_step_interval": "training steps between validation passes",
    "testing_percentage": "percentage of images in the test bucket",
    "validation_percentage": "percentage of images in the validation bucket",
    "print_misclassified_test_images": "print the test images the model gets wrong",
    "class_weights": "none, or balanced: weight the loss inversely to class frequency",
    "report": "write report.html, its figures and the data checks (label_issues.csv, near_duplicates.csv)",
    "seed": "random seed of the training run",
    "flip_left_right": "randomly mirror training images (turns the distortion path on)",
    "random_crop": "percentage of margin to randomly crop training images from (distortion path)",
    "random_scale": "percentage by which to randomly enlarge training images (distortion path)",
    "random_brightness": "percentage by which to randomly brighten or darken training images (distortion path)",
    "random_resized_crop": "train on random crops keeping at least this percentage of the image "
    "area, any aspect from 3:4 to 4:3, resized back (distortion path; 0 = off)",
    "fine_tune_layers": "after the head, also train the top N backbone layers; -1 = all, 0 = off",
    "fine_tune_epochs": "passes over the training images when fine-tuning",
    "fine_tune_learning_rate": "peak AdamW learning rate of fine-tuning, of the head and the top "
    "block (lower blocks: see --fine_tune_layer_decay)",
    "fine_tune_batch_size": "images per fine-tuning step",
    "fine_tune_warmup_epochs": "epochs over which the fine-tuning rate rises linearly from 0 before "
    "its cosine decay",
    "fine_tune_layer_decay": "factor by which the fine-tuning rate shrinks per backbone block "
    "toward the input (1 = one rate for all)",
    "fine_tune_weight_decay": "AdamW decoupled weight decay of fine-tuning (0 = none)",
    "fine_tune_label_smoothing": "label smoothing of the fine-tuning loss (0 = none)",
    "test_time_flip": "the exported model averages each picture's logits with its mirror's",
    "unknown_acceptance": "share of in-class validation images the unknown detector accepts; "
    "pictures past its threshold are labelled unknown",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field; defaults stay None so YAML values are not masked."""
    parser = OneLineErrorParser(
        prog="python -m retrain",
        description="Train a new softmax layer on a frozen ImageNet backbone "
        "from a folder of labelled photos.",
        argument_default=None,
    )
    add_version(parser)
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of settings (flags given here override it)"
    )
    add_config_flags(parser)
    return parser


def add_config_flags(parser, names=None):
    """One flag per Config field named in ``names`` (all when None), help from HELP."""
    defaults = config_lib.Config()
    for field in fields(config_lib.Config):
        if names is not None and field.name not in names:
            continue
        default = getattr(defaults, field.name)
        flag = f"--{field.name}"
        # The fields a preset sets are Optional (None: the preset's value).
        kind_name = field.type.removeprefix("Optional[").removesuffix("]")
        if kind_name == "bool":
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{HELP[field.name]} (default: {'on' if default else 'off'})",
            )
            continue
        if field.type == "list[str]":
            parser.add_argument(
                flag, nargs="+", metavar="KIND", help=f"{HELP[field.name]} (default: none)"
            )
            continue
        kind = {"int": int, "float": float}.get(kind_name, str)
        parser.add_argument(
            flag,
            type=kind,
            metavar=field.name.upper(),
            help=f"{HELP[field.name]} (default: {default})",
        )


def resolve_config(argv: list[str] | None = None) -> config_lib.Config:
    """Parse argv and merge defaults < preset < YAML < flags into a validated Config."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    # The same path as retrain.train's keyword arguments: presets.config_from.
    given = {key: value for key, value in args.items() if value is not None}
    return presets.config_from(given, config_path)


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `docker stop`), raised where Ctrl-C raises KeyboardInterrupt.

    A subclass, so every clean-up that Ctrl-C runs (finished cache batches
    kept, the staging output folder removed) runs for SIGTERM too.
    """


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m retrain` and the `retrain` console script.

    Exit status: 0 done; 2 bad input or settings (one stderr line); 130 Ctrl-C
    and 143 SIGTERM (the cache keeps every finished batch, the output folder
    keeps the previous run).
    """
    messages.setup("retrain")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        config = resolve_config(argv)
        # Keras's scikit-learn, pandas and matplotlib hooks cost ~2 s: see quiet_tensorflow.
        import_tensorflow(keras_extras=False)
        from retrain import run  # deferred: importing TensorFlow takes seconds

        run.run(config)
    except RetrainError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt as interrupt:
        cause, status = (
            ("terminated (SIGTERM)", 143)
            if isinstance(interrupt, Terminated)
            else ("interrupted", 130)
        )
        logger.info(
            "retrain: %s; the bottleneck cache keeps what was extracted, and the "
            "output folder keeps its previous outputs.",
            cause,
        )
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def entry_point() -> None:
    """`python -m retrain` and the `retrain` command: main(), then a fast exit."""
    exit_without_teardown(main())


if __name__ == "__main__":
    entry_point()
