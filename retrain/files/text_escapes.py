"""How retrain writes names it did not choose into text files: the one set of escapes.

Image paths come from the file system, where a name is any bytes: a Latin-1
``caf\\xe9.jpg`` reaches Python as ``'caf\\udce9.jpg'`` (a lone surrogate),
which UTF-8 cannot encode, and a name may hold a tab, a line break or U+2028.

* `one_line(path)`: the path as one line of UTF-8 text (undecodable bytes
  as ``\\xe9``, line breaks and tabs as ``\\n``, ``\\t``, ``\\u2028``).
  skipped_images.txt, the CSVs, run_record.json, metrics.json and the page all
  write paths this way, so the same image reads the same everywhere, and the
  report's thumbnail names are derived from it. It is idempotent.
* `utf8(text)`: only the undecodable bytes escaped (for free text such as a
  settings value on the page).
* `csv_text` / `csv_rows`: CSV cells a spreadsheet would evaluate as a formula
  (a first character ``= + - @``, tab or CR) get a ``'`` in front (OWASP's
  rule for CSV injection); `from_csv` takes exactly that quote away again, so
  reading a retrain CSV back gives the original values.
"""

from __future__ import annotations

import csv
import io
import re

# Characters UTF-8 cannot encode, as backslash escapes (skipped_images.txt has always had them).
_ENCODE_ERRORS = "backslashreplace"
# First characters of a cell that spreadsheets evaluate (OWASP, "CSV Injection").
FORMULA_STARTS = "=+-@\t\r"
# A cell the writer quoted: any run of quotes, then a formula character. A
# value that itself starts with quotes before such a character gets one more,
# so that reading back strips exactly the quote the writer added.
_QUOTED = re.compile(r"'*[=+\-@\t\r]")


def utf8(text: str) -> str:
    """``text`` with the characters UTF-8 cannot encode (lone surrogates) escaped.

    A byte the file system gave (``\\udce9`` from surrogateescape) shows as
    that byte, ``\\xe9``; any other lone surrogate as ``\\udNNN``.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate surrogateescape did not make
        return text.encode("utf-8", _ENCODE_ERRORS).decode("utf-8")
    return raw.decode("utf-8", _ENCODE_ERRORS)


def one_line(path: str) -> str:
    """A path as one line of UTF-8 text: undecodable bytes, line breaks and tabs escaped.

    ``'caf\\udce9.jpg'`` -> ``'caf\\\\xe9.jpg'``; ``'a\\tb'`` -> ``'a\\\\tb'``.
    Ordinary names come back unchanged, and one_line(one_line(p)) == one_line(p).
    """
    escaped = utf8(str(path))
    return "".join(repr(c)[1:-1] if c.isspace() and c != " " else c for c in escaped)


def csv_text(value):
    """A cell as a CSV writer should write it: text that would be a formula gets a ``'``.

    Numbers (int, float, numpy scalars) pass unchanged, so a negative number
    stays a number; only str cells are quoted.
    """
    if isinstance(value, str) and _QUOTED.match(value):
        return "'" + value
    return value


def from_csv(text: str) -> str:
    """The original value of a text cell `csv_text` wrote (its added ``'`` removed)."""
    if text.startswith("'") and _QUOTED.match(text, 1):
        return text[1:]
    return text


def csv_rows(header: list[str], rows) -> str:
    """A whole CSV file as text: the header, then each row, every cell through `csv_text`.

    rows: iterables of cells (str or numbers). Text cells must already be one
    line of UTF-8 where they are paths (`one_line`); the csv module quotes
    commas and quotes.
    """
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow([csv_text(name) for name in header])
    writer.writerows([csv_text(cell) for cell in row] for row in rows)
    return buffer.getvalue()
