"""The backbone a run trains or exports with: loaded once here, without its ImageNet top.

`plain_backbone` is the frozen feature extractor (the distortions path, the
export of a cached head); `tunable_backbone` is the one fine-tuning trains,
its --fine_tune_layers checked against it before any long work.
"""

from __future__ import annotations

from retrain import backbones


def plain_backbone(spec, weights_file=None):
    """keras.Model: float32 [b, size, size, 3] RGB in [0, 255] -> float32 [b, feature_dim].

    spec: the BackboneSpec; weights_file: Config.backbone_weights (None: the
    architecture's pinned weights).
    """
    return backbones.load(spec.name, include_top=False, weights_file=weights_file)


def tunable_backbone(spec, weights_file, fine_tune_layers: int):
    """The plain backbone with --fine_tune_layers checked against it, then frozen again.

    Raises RetrainError (from fine_tune.unfreeze) when fine_tune_layers does
    not fit the backbone.
    """
    from retrain.training import fine_tune  # deferred: it imports TensorFlow

    backbone = plain_backbone(spec, weights_file)
    fine_tune.unfreeze(backbone, fine_tune_layers)
    fine_tune.freeze(backbone)
    return backbone
