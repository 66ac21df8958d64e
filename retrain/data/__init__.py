"""Data: discovery and the hash split, class checks, decoding, the one tf.data builder,
distortions, row sampling."""
