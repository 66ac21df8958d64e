"""Files: atomic writes, the output folder and its marker, local and gs:// paths, digests, reading received files."""
