"""Parks a retrain subprocess at a named point, so a fault test can kill it exactly there.

The seam lives here, not in retrain: ``driver(point, then)`` is Python source
for ``python -c`` that wraps one function of that process only (the journal's
append, or ``os.replace`` for the fold and a shard's rename), then runs
``then``. At the point the process touches a marker file and sleeps forever.

Points (the marker each leaves):

* ``journal:<n>``: after the n-th journal batch is written (``<journal folder>.paused``);
* ``fold-before-replace``: the merged main file is written under its temporary
  name, not yet renamed over the cache (``<cache>.h5.paused``);
* ``fold-after-replace``: the main file is renamed, the journal not yet
  cleared (``<cache>.h5.paused``);
* ``shard-partial:<n>``: the n-th shard file is written under its temporary
  name, not yet renamed (``<shard file>.paused``).
"""

# Python leaves SIGINT ignored in a process started with it ignored (a
# background job of a non-interactive shell: `cmd &`), so Ctrl-C tests would
# hang there; the driver restores Python's own handler, as a terminal gives it.
_PARK = """
import os, signal, time
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)

def _park(marker):
    Path(marker).touch()
    while True:
        time.sleep(60)
"""

_JOURNAL = """
from retrain.cache import journal as _journal
_append, _written = _journal.Journal.append, [0]

def _append_then_park(self, records):
    _append(self, records)
    if len(records):
        _written[0] += 1
        if _written[0] == {count}:
            _park(f"{{self.folder}}.paused")

_journal.Journal.append = _append_then_park
"""

_REPLACE = """
_replace, _renamed = os.replace, [0]

def _replace_then_park(source, target, **kwargs):
    name = os.path.basename(str(target))
    wanted = {wanted!r}
    if wanted == "fold" and name.endswith(".h5") or wanted == "shard" and ".shard-" in name:
        _renamed[0] += 1
        if _renamed[0] == {count} and {before}:
            _park(f"{{target}}.paused")
        _replace(source, target, **kwargs)
        if _renamed[0] == {count} and not {before}:
            _park(f"{{target}}.paused")
        return
    _replace(source, target, **kwargs)

os.replace = _replace_then_park
"""


def driver(point, then):
    """Source for ``python -c``: park at ``point`` (see the module docstring), run ``then``."""
    name, _, count = point.partition(":")
    count = int(count or 1)
    if name == "journal":
        seam = _JOURNAL.format(count=count)
    elif name in ("fold-before-replace", "fold-after-replace"):
        seam = _REPLACE.format(wanted="fold", count=count, before=name.endswith("before-replace"))
    elif name == "shard-partial":
        seam = _REPLACE.format(wanted="shard", count=count, before=True)
    else:
        raise ValueError(f"unknown pause point. Received: point={point!r}")
    return _PARK + seam + then


def cli_driver(point, argv):
    """``driver`` that then runs ``retrain`` with ``argv`` as ``python -m retrain`` does."""
    return driver(
        point, f"\nfrom retrain import cli\ncli.exit_without_teardown(cli.main({argv!r}))\n"
    )
