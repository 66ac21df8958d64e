r"""The labels file: class names in output order, one per "\n"-ended line (UTF-8).

Only "\n" ends a line, so names keep any other character (see
`check_class_names`); `read_labels` splits at "\n" alone for the same reason.
"""

from __future__ import annotations

from pathlib import Path

from retrain.errors import RetrainError
from retrain.files import atomic_write


def check_class_names(class_names: list[str]) -> None:
    r"""Raise RetrainError unless every name can be a line of labels.txt and back.

    labels.txt separates names by "\n" only, so any other character, including
    the Unicode line separators (U+2028, U+2029, U+0085, \x0b, \x0c), tabs and
    repeated spaces, survives exactly. Refused: empty names, names with "\n" or
    "\r" (text readers turn "\r" into a line end) and names that are not valid
    Unicode (folder names whose bytes are not UTF-8).
    """
    if not class_names:
        raise RetrainError(
            "Class names must be non-empty single-line strings; there are none. "
            "Received: class_names=[]"
        )
    for name in class_names:
        if not name or "\n" in name or "\r" in name:
            raise RetrainError(
                f"Class names must be non-empty single-line strings: rename the "
                f"class folder. Received: class name {name!r}"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise RetrainError(
                f"Class name {name!r} is not valid UTF-8 (the folder name's bytes "
                "are in another encoding): rename the class folder."
            ) from None


def write_labels(class_names: list[str], path) -> Path:
    r"""Writes class names, one per "\n"-ended line in output order (UTF-8), atomically."""
    check_class_names(class_names)
    path = Path(path)
    try:
        atomic_write.write_text(path, "".join(f"{name}\n" for name in class_names))
    except OSError as error:
        raise RetrainError(f"Cannot write {path}: {error.strerror or error}.") from None
    return path


def read_labels(path) -> list[str]:
    """The class names of a labels file, in output order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise RetrainError(
            f"Cannot read labels file {path}: {reason}. Pass the labels.txt written "
            f"with the model. Received: path={path}"
        ) from None
    # Only "\n" ends a name: str.splitlines would also split at U+2028, U+0085,
    # \x0b, \x0c... which may be part of a class folder's name.
    names = text.split("\n")
    if names[-1] == "":
        names.pop()
    if not names or not all(names):
        raise RetrainError(
            f"Labels file {path} must list one class name per line, with no blank "
            f"lines. Received {len(names)} lines."
        )
    return names
