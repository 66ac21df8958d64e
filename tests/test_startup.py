"""Start-up: what the commands import before they need it, in real subprocesses.

`--help` and a usage error must not import TensorFlow or the report's
libraries; `import retrain.run` must not import them either (a --cache_only
run never needs them); the commands' TensorFlow import leaves out the
libraries Keras would import only for integrations retrain does not use.
No timings here: benchmarks/startup.py measures them.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Libraries only a stage that uses them may import (TensorFlow: only a run or a labelling).
HEAVY = ("tensorflow", "keras", "matplotlib", "sklearn", "cleanlab", "jinja2", "pandas")


def run_python(*arguments):
    """`python -X importtime ARGUMENTS` -> (status, stdout, stderr lines, top-level modules imported)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    lines = result.stderr.splitlines()
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in lines
        if line.startswith("import time:") and line.count("|") == 2
    }
    messages = [line for line in lines if not line.startswith("import time:")]
    assert "retrain" in imported, result.stderr[-2000:]  # the import listing was read
    return result.returncode, result.stdout, messages, imported


@pytest.mark.parametrize(
    "command", [["-m", "retrain"], ["-m", "retrain.label_image"], ["-m", "retrain.report"]]
)
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_heavy_library(command, flag):
    status, out, messages, imported = run_python(*command, flag)
    assert status == 0 and ("usage:" in out if flag == "--help" else out.startswith("retrain "))
    assert messages == []
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "retrain", "--image_dir", "photos"],
        [
            "-m",
            "retrain.label_image",
            "--graph",
            "m.keras",
            "--labels",
            "l.txt",
            "--image",
            "a.png",
        ],
    ],
)
def test_usage_error_is_one_line_exit_2_and_imports_no_heavy_library(command):
    status, out, messages, imported = run_python(*command, "--no_such_flag", "3")
    assert status == 2 and out == ""
    assert len(messages) == 1 and "--no_such_flag" in messages[0] and "Traceback" not in messages[0]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_importing_the_run_leaves_the_heavy_libraries_to_their_stages():
    status, out, messages, imported = run_python("-c", "import retrain.run")
    assert status == 0 and messages == []
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_the_commands_tensorflow_leaves_out_keras_extras_which_stay_importable():
    """keras_extras=False: Keras loads without scikit-learn, pandas and matplotlib, and
    retrain's own stages import them afterwards as usual."""
    code = (
        "import sys\n"
        "from retrain.quiet_tensorflow import KERAS_EXTRAS, import_tensorflow\n"
        "tf = import_tensorflow(keras_extras=False)\n"
        "assert 'keras' in sys.modules and tf.constant(2.0).numpy() == 2.0\n"
        "print(sorted(name for name in KERAS_EXTRAS if name in sys.modules))\n"
        "from sklearn import metrics\n"
        "import matplotlib, pandas\n"
        "print(metrics.accuracy_score([0, 1], [0, 1]), matplotlib.get_backend() != '', "
        "len(pandas.DataFrame({'a': [1]})))\n"
    )
    status, out, messages, _ = run_python("-c", code)
    assert status == 0, messages
    assert out.splitlines() == ["[]", "1.0 True 1"]


def test_the_default_tensorflow_import_keeps_keras_as_installed():
    """A library caller's import_tensorflow() changes nothing in Keras: its
    scikit-learn wrappers find scikit-learn."""
    code = (
        "import sys\n"
        "from retrain.quiet_tensorflow import import_tensorflow\n"
        "import_tensorflow()\n"
        "from keras.src.wrappers import fixes\n"
        "print(fixes.sklearn is not None, 'sklearn' in sys.modules)\n"
    )
    status, out, messages, _ = run_python("-c", code)
    assert status == 0, messages
    assert out.split() == ["True", "True"]


def test_label_image_loads_the_model_without_the_report_libraries(photo_model):
    """The command on one picture: labelled, and none of scikit-learn, pandas,
    matplotlib, cleanlab, Jinja2 imported (Keras's hooks for them included)."""
    picture = str(photo_model["photos"] / "rocket" / "4.png")
    argv = ["--graph", photo_model["graph"], "--labels", photo_model["labels"], "--image", picture]
    code = (
        "import sys\n"
        "from retrain import label_image\n"
        f"status = label_image.main({argv!r})\n"
        f"print(status, sorted(set(sys.modules) & set({HEAVY!r})))\n"
    )
    status, out, messages, _ = run_python("-c", code)
    assert status == 0, messages
    lines = out.splitlines()
    assert lines[0] == picture and lines[1].split()[0] == "rocket"
    assert lines[-1] == "0 ['keras', 'tensorflow']"
