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

Decoding and resizing inside the graph are `retrain.export.decode_graph`'s, which
reproduce label_image's Pillow decoding. The labels are in the graph and in
the folder as `assets/labels.txt`.

A SavedModel is a program: its graph may hold any TensorFlow op, including
ops that read and write files, and loading it runs none of retrain's checks.
Load only folders from a trusted source (`.keras` is the format to take from
others; see `retrain.export.keras_file.load_classifier`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from retrain.config import check_saved_model_dir
from retrain.errors import RetrainError
from retrain.export.decode_graph import decode_image_bytes
from retrain.export.labels import write_labels
from retrain.files import atomic_write, run_marker
from retrain.quiet_tensorflow import import_tensorflow

tf = import_tensorflow()

TOP_K = 5


class _Exported(tf.Module):
    """What the SavedModel holds: the fixed-size classifier, the labels, the signatures."""

    def __init__(self, fixed, class_names, labels_file):
        super().__init__(name="retrained_classifier")
        self.classifier = fixed
        self.size = int(fixed.input_shape[1])
        self.labels_asset = tf.saved_model.Asset(str(labels_file))
        self.class_names = list(class_names)
        self.top_k = min(TOP_K, len(class_names))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def __call__(self, images):
        """The serving_default signature, also what calling the loaded SavedModel runs."""
        pixels = tf.map_fn(
            lambda content: decode_image_bytes(content, self.size),
            images,
            fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.float32),
        )
        probabilities = self.classifier(pixels, training=False)
        scores, indices = tf.math.top_k(probabilities, k=self.top_k)
        top_labels = tf.gather(tf.constant(self.class_names), indices)
        return {
            "probabilities": probabilities,
            "label": top_labels[:, 0],
            "top_labels": top_labels,
            "top_scores": scores,
        }

    def classify_pixels(self, pixels):
        return {"probabilities": self.classifier(pixels, training=False)}


def save_saved_model(fixed, class_names: list[str], path) -> Path:
    """Writes the SavedModel folder `path` atomically (a temporary folder, then renames).

    Args:
      fixed: `classifier.fixed_size_classifier(...)`, float32 [batch, size, size, 3]
        -> float32 [batch, len(class_names)].
      class_names: the labels in output order.
      path: the folder; a folder an earlier run wrote there (it holds
        retrain's marker, ``run_marker.MARKER``) is replaced, files in it that
        the run did not write are carried into the new one; any other
        existing content is refused with a RetrainError.
    """
    path = Path(path)
    check_saved_model_dir(path)
    size = int(fixed.input_shape[1])
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
            module = _Exported(fixed, class_names, labels_file)
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
    """A SavedModel written by `save_saved_model`, called on pixels (for label_image)."""

    def __init__(self, path):
        path = Path(path)
        if not (path / "saved_model.pb").is_file():
            raise RetrainError(
                f"{path} is not a SavedModel folder (it has no saved_model.pb). Pass the "
                f"--saved_model_dir folder of a retrain run. Received: graph={path}"
            )
        try:
            self._signature = tf.saved_model.load(str(path)).signatures["classify_pixels"]
        except (KeyError, OSError, ValueError, tf.errors.OpError) as error:
            raise RetrainError(
                f"Cannot load SavedModel {path}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no details'}. "
                "Re-export it with a retrain run."
            ) from None
        spec = self._signature.structured_input_signature[1]["pixels"]
        self.input_size = int(spec.shape[1])
        self.num_classes = int(self._signature.structured_outputs["probabilities"].shape[-1])

    def predict(self, pixels):
        """float32 [n, size, size, 3] -> np.ndarray float32 [n, num_classes]."""
        return self._signature(pixels=tf.constant(pixels, tf.float32))["probabilities"].numpy()
