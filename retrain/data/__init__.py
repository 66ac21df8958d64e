"""Data: discovery and the hash split, decoding, the one tf.data builder, distortions, row sampling."""
