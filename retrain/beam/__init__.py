"""Fill the bottleneck cache with Apache Beam (the optional ``beam`` extra).

``python -m retrain.beam`` (``__main__``) is the command; ``pipeline`` holds
the Beam pipeline and imports apache_beam, so import it only when installed.
"""
