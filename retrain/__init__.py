"""retrain: transfer learning from a folder of labelled photos, on a CPU.

A frozen ImageNet backbone turns every image into a bottleneck vector once
(cached in HDF5); only a new softmax layer is trained on those vectors.
"""

__version__ = "0.1.0"

# retrain's notes (INFO) reach stderr wherever it runs: see retrain.messages.
from retrain import messages  # noqa: E402, F401
