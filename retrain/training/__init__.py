"""Training: the new softmax layer on bottlenecks, and fine-tuning with the backbone.

settings       HeadSettings, FineTuneSettings, DistortionSettings, built once from a Config
head           build_head; train_head (arrays) and fit_head (datasets) -> TrainResult
fit            FitLoop and the one fit loop every path uses
callbacks      ValidationScores, PixelValidationScores (all and distinct validation images),
               EvaluationLog (history, TensorBoard, progress bar)
class_weights  balanced weights and Keras's {class: weight}
checkpoints    Checkpoint, run_fingerprint, resume_point
datasets       cached and decoded (distorted) training data as tf.data pipelines
fine_tune      unfreeze / freeze and fine_tune -> FineTuneResult
backbone       the backbone without its top: plain (frozen) or tunable (layers checked)
classifier     the three training paths -> TrainedClassifier
predict        class probabilities for every split and path
"""
