"""The SavedModel export: encoded image bytes in, probabilities and labels out.

`save_saved_model` writes a SavedModel folder with two signatures:

- `serving_default`: `images`, tf.string [batch] of encoded JPEG or PNG files
  (BMP, WebP and the first frame of a GIF decode too) -> `probabilities` float32
  [batch, classes], `label` tf.string [batch] (the top class), `top_labels`
  tf.string [batch, k] and `top_scores` float32 [batch, k], best first, k =
  min(5, classes). For TF Serving or any SavedModel host; calling the loaded
  object, `tf.saved_model.load(DIR)(images)`, runs the same function.
- `classify_pixels`: `pixels` float32 [batch, size, size, 3] RGB in [0, 255],
  already resized -> `probabilities`. `label_image` uses it, after decoding
  with Pillow as training did.

With an unknown detector (`save_saved_model(..., threshold=...)` on a model
from `retrain.export.unknown_graph.scored_classifier`) both signatures also
return `unknown_score` float32 [batch] (the cosine distance to the k-th
nearest training vector, computed in the graph) and `unknown` bool [batch]
(score > the threshold, a constant in the graph). Without one, the outputs
are only those above.

Decoding and resizing inside the graph are `retrain.export.decode_graph`'s, which
reproduce label_image's Pillow decoding. The labels are in the graph and in
the folder as `assets/labels.txt`.

A SavedModel is a program: its graph may hold any TensorFlow op, including
ops that read and write files, and loading it runs none of retrain's checks.
Load only folders from a trusted source (`.keras` is the format to take from
others; see `retrain.export.keras_file.load_classifier`).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from retrain.config import check_saved_model_dir
from retrain.errors import RetrainError
from retrain.export.decode_graph import decode_image_bytes
from retrain.export.labels import write_labels
from retrain.files import atomic_write, run_marker
from retrain.quiet_tensorflow import import_tensorflow

tf = import_tensorflow()
logger = logging.getLogger(__name__)

TOP_K = 5


class _Exported(tf.Module):
    """What the SavedModel holds: the fixed-size classifier, the labels, the signatures."""

    def __init__(self, fixed, class_names, labels_file, threshold=None):
        super().__init__(name="retrained_classifier")
        self.classifier = fixed
        self.size = int(fixed.inputs[0].shape[1])
        self.labels_asset = tf.saved_model.Asset(str(labels_file))
        self.class_names = list(class_names)
        self.top_k = min(TOP_K, len(class_names))
        # A variable, so the loaded SavedModel exposes it (`PixelClassifier` reads it).
        self.unknown_threshold = (
            None
            if threshold is None
            else tf.Variable(threshold, dtype=tf.float32, trainable=False, name="unknown_threshold")
        )

    def _classify(self, pixels):
        """{"probabilities"} and, with a detector, {"unknown_score", "unknown"} of the pixels."""
        if self.unknown_threshold is None:
            return {"probabilities": self.classifier(pixels, training=False)}
        probabilities, scores = self.classifier(pixels, training=False)
        return {
            "probabilities": probabilities,
            "unknown_score": scores,
            "unknown": scores > self.unknown_threshold,
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def __call__(self, images):
        """The serving_default signature, also what calling the loaded SavedModel runs."""
        pixels = tf.map_fn(
            lambda content: decode_image_bytes(content, self.size),
            images,
            fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.float32),
        )
        outputs = self._classify(pixels)
        scores, indices = tf.math.top_k(outputs["probabilities"], k=self.top_k)
        top_labels = tf.gather(tf.constant(self.class_names), indices)
        return {
            **outputs,
            "label": top_labels[:, 0],
            "top_labels": top_labels,
            "top_scores": scores,
        }

    def classify_pixels(self, pixels):
        return self._classify(pixels)


def save_saved_model(fixed, class_names: list[str], path, threshold=None) -> Path:
    """Writes the SavedModel folder `path` atomically (a temporary folder, then renames).

    Args:
      fixed: `unknown_graph.deployable(...)`: float32 [batch, size, size, 3]
        -> float32 [batch, len(class_names)], or with a detector
        [probabilities, float32 [batch] unknown scores].
      class_names: the labels in output order.
      threshold: the detector's threshold (scores above it are unknown);
        given exactly when `fixed` has the score output.
      path: the folder; a folder an earlier run wrote there (it holds
        retrain's marker, ``run_marker.MARKER``) is replaced, files in it that
        the run did not write are carried into the new one; any other
        existing content is refused with a RetrainError.
    """
    path = Path(path)
    check_saved_model_dir(path)
    if (threshold is not None) != (len(fixed.outputs) == 2):
        raise ValueError("threshold must be given exactly for a model with the score output")
    size = int(fixed.inputs[0].shape[1])
    run_id = uuid.uuid4().hex
    try:
        with atomic_write.atomic_folder(
            path,
            seal=lambda folder: run_marker.write_marker(
                folder, run_id, run_marker.written_names(folder)
            ),
            clear_old=lambda old: run_marker.clear_previous(old, path, run_id),
        ) as temporary:
            labels_file = write_labels(class_names, temporary / "labels.txt")
            module = _Exported(
                fixed, class_names, labels_file, None if threshold is None else float(threshold)
            )
            signatures = {
                "serving_default": module.__call__,
                "classify_pixels": tf.function(
                    module.classify_pixels,
                    input_signature=[
                        tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")
                    ],
                ),
            }
            tf.saved_model.save(module, str(temporary), signatures=signatures)
            labels_file.unlink()  # saved into assets/
    except OSError as error:
        raise RetrainError(f"Cannot write {path}: {error.strerror or error}.") from None
    return path


class PixelClassifier:
    """A SavedModel written by `save_saved_model`, called on pixels (for label_image).

    unknown: whether to return its unknown scores (when it has them); one
    warning names a SavedModel without them.
    """

    def __init__(self, path, unknown=True):
        path = Path(path)
        if not (path / "saved_model.pb").is_file():
            raise RetrainError(
                f"{path} is not a SavedModel folder (it has no saved_model.pb). Pass the "
                f"--saved_model_dir folder of a retrain run. Received: graph={path}"
            )
        try:
            loaded = tf.saved_model.load(str(path))
            self._signature = loaded.signatures["classify_pixels"]
        except (KeyError, OSError, ValueError, tf.errors.OpError) as error:
            raise RetrainError(
                f"Cannot load SavedModel {path}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no details'}. "
                "Re-export it with a retrain run."
            ) from None
        spec = self._signature.structured_input_signature[1]["pixels"]
        self.input_size = int(spec.shape[1])
        outputs = self._signature.structured_outputs
        self.num_classes = int(outputs["probabilities"].shape[-1])
        self.unknown_threshold = None
        if unknown and "unknown_score" in outputs:
            self.unknown_threshold = float(loaded.unknown_threshold.numpy())
        elif unknown:
            logger.warning(
                "%s has no unknown score (exported before unknown detection, or without a "
                "detector): its pictures are labelled, none can be called unknown.",
                path,
            )

    def predict(self, pixels):
        """float32 [n, size, size, 3] -> np.ndarray float32 [n, num_classes]."""
        return self.predict_scored(pixels)[0]

    def predict_scored(self, pixels):
        """float32 [n, size, size, 3] -> (float32 [n, num_classes], float32 [n] unknown scores
        or None without a detector)."""
        outputs = self._signature(pixels=tf.constant(pixels, tf.float32))
        scores = outputs.get("unknown_score") if self.unknown_threshold is not None else None
        return outputs["probabilities"].numpy(), None if scores is None else scores.numpy()
