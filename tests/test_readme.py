"""The README and docs/ say only true things about the commands.

The cheap commands of README.md's fenced blocks run and exit 0; every
`make` target, every `--flag`, every relative link (with its anchor) and
every quoted source path named in README.md or docs/*.md exists. A flag is
checked against the command it is written with: `python -m retrain`,
label_image, report, beam (plus Apache Beam's own pipeline options),
backbones, or a benchmark script (its `add_argument` calls); a flag written
alone is checked against the union of the entry points' help.
"""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent

# Cheap and safe: each is a --help, a listing, or make's dry run.
CHEAP_COMMANDS = [
    "python -m retrain --help",
    "python -m retrain.label_image --help",
    "python -m retrain.report --help",
    "python -m retrain.beam --help",
    "python -m retrain.backbones --describe",
    "retrain --help",
    "retrain-label-image --help",
    "retrain-report --help",
    "retrain-demo --help",
    "retrain --version",
    "make -n demo",
    "make -n test",
]
# The entry points whose help lists their flags, as `python -m` modules.
ENTRY_MODULES = {
    "retrain": "retrain",
    "label_image": "retrain.label_image",
    "report": "retrain.report",
    "beam": "retrain.beam",
    "backbones": "retrain.backbones",
    "demo": "retrain.demo",
}
# Programs that are not ours: their flags are not checked.
EXTERNAL = ("tensorboard", "pip ", "gcloud", "apt-get", "import ", "serving", "print(")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*(?![\w<])(?!-<)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SOURCE_PATH = re.compile(r"(?<![\w./])((?:retrain|benchmarks|tests)/[\w./-]*\w/?)")


def run(command, timeout=300):
    """Runs `command` (a shell-like string) at the repository root with the venv first on PATH."""
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- reading the documents ---------------------------------------------------


def split_code(text):
    """Returns (prose, code lines) of a Markdown text.

    Code lines are those of ``` fences and of indented blocks (4+ spaces
    after a blank line, or continuing one), with backslash continuations
    joined and full-line `#` comments dropped; prose is the rest.
    """
    prose, code, in_fence, in_indented, previous_blank = [], [], False, False, True
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        indented = line.startswith("    ") and (previous_blank or in_indented)
        in_indented = indented or (in_indented and not line.strip())
        if in_fence or indented:
            code.append(line.strip())
        else:
            prose.append(line)
        previous_blank = not line.strip()
    joined = "\n".join(code).replace("\\\n", " ")
    commands = [c for c in joined.split("\n") if c and not c.startswith("#")]
    return "\n".join(prose), [c.split("  #")[0].strip() for c in commands]


def code_segments(text):
    """Every command line of code blocks and every inline `code span` of `text`."""
    prose, commands = split_code(text)
    spans = [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]
    return commands + spans


def prose_without_code(text):
    prose, _ = split_code(text)
    return re.sub(r"`[^`]+`", "", prose)


def readme_commands():
    """README.md's fenced commands, a leading `.venv/bin/` removed."""
    _, commands = split_code(README.read_text())
    return [c.removeprefix(".venv/bin/") for c in commands]


# --- what exists ---------------------------------------------------------------


@functools.cache
def make_targets():
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


@functools.cache
def make_recipe_script(target):
    """The benchmarks/*.py script the Makefile's `target` runs, or None."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}\s*:.*\n((?:\t.*\n)+)", text, flags=re.M)
    script = match and re.search(r"benchmarks/(\w+)\.py", match.group(1))
    return script.group(1) if script else None


@functools.cache
def entry_flags(name):
    """The flags `python -m <module> --help` lists for one entry point."""
    result = run(f"python -m {ENTRY_MODULES[name]} --help")
    assert result.returncode == 0, result.stderr
    flags = set(FLAG.findall(result.stdout))
    if name == "beam":
        flags |= beam_pipeline_flags()
    return flags


@functools.cache
def beam_pipeline_flags():
    """Every flag Apache Beam's PipelineOptions subclasses define (passed through by retrain.beam)."""
    script = (
        "import argparse\n"
        "from apache_beam.options.pipeline_options import PipelineOptions\n"
        "def subclasses(c):\n"
        "    for s in c.__subclasses__():\n"
        "        yield s\n"
        "        yield from subclasses(s)\n"
        "parser = argparse.ArgumentParser()\n"
        "for c in set(subclasses(PipelineOptions)):\n"
        "    c._add_argparse_args(parser)\n"
        "print(' '.join(o for a in parser._actions for o in a.option_strings))\n"
    )
    result = run(f"python -c {shlex.quote(script)}")
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@functools.cache
def script_flags(name):
    """The flags a benchmark script's `add_argument` calls define."""
    text = (ROOT / "benchmarks" / f"{name}.py").read_text()
    return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", text)) | {"--help"}


def allowed_flags(segment):
    """The flags valid in `segment`, or None when it runs a program that is not ours."""
    script = re.search(r"(?:benchmarks/)?\b(\w+)\.py\b", segment)
    if script and (ROOT / "benchmarks" / f"{script.group(1)}.py").exists():
        return script_flags(script.group(1))
    make = re.search(r"\bmake\s+([a-z][\w-]*)", segment)
    if make and make_recipe_script(make.group(1)):
        return script_flags(make_recipe_script(make.group(1)))
    if segment.lstrip().startswith(EXTERNAL):
        return None
    for marker, name in [
        (r"retrain[.-]label[_-]image|^label_image", "label_image"),
        (r"retrain[.-]report", "report"),
        (r"retrain\.beam", "beam"),
        (r"retrain\.backbones", "backbones"),
        (r"retrain[.-]demo", "demo"),
    ]:
        if re.search(marker, segment):
            return entry_flags(name)
    return set().union(
        *(entry_flags(n) for n in ("retrain", "label_image", "report", "beam", "demo"))
    )


# --- the checks, as functions of a text so that they can be shown to fail -----------


def unknown_flags(text):
    """The `--flags` of `text` that the command they are written with does not take."""
    unknown = []
    for segment in code_segments(text) + [prose_without_code(text)]:
        allowed = allowed_flags(segment)
        if allowed is not None:
            unknown += [f for f in FLAG.findall(segment) if f not in allowed]
    return unknown


def unknown_make_targets(text):
    named = set()
    for segment in code_segments(text):
        named |= set(re.findall(r"(?<![\w-])make\s+(?:-\w+\s+)*([a-z][\w-]*)", segment))
    return sorted(named - make_targets())


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@functools.cache
def anchors(path):
    prose, _ = split_code(path.read_text())
    seen, result = {}, set()
    for heading in re.findall(r"^#+ (.+)$", prose, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(text, document):
    """The relative links of `text` (read as the file `document`) to a missing file or anchor."""
    broken = []
    for target in LINK.findall(prose_without_code(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    return broken


def missing_source_paths(text):
    quoted = set()
    for segment in code_segments(text):
        quoted |= set(SOURCE_PATH.findall(segment))
    return sorted(p for p in quoted if not (ROOT / p).exists())


# --- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("command", CHEAP_COMMANDS)
def test_cheap_readme_command_runs(command):
    assert command in readme_commands(), f"README.md no longer shows {command!r}"
    result = run(command)
    assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"


@pytest.mark.parametrize("document", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_name_in_the_document_exists(document):
    text = document.read_text()
    assert unknown_flags(text) == []
    assert unknown_make_targets(text) == []
    assert broken_links(text, document) == []
    assert missing_source_paths(text) == []


def test_readme_is_the_short_door():
    assert len(README.read_text().split("\n")) < 200


def test_the_checks_catch_what_does_not_exist():
    """A doc naming a fake flag, target, link or path fails the checks above."""
    assert unknown_flags("Run `python -m retrain --image_dir x --no_such_flag 3`.") == [
        "--no_such_flag"
    ]
    assert unknown_flags("    python -m retrain.label_image --graph m --no_such_flag\n") == [
        "--no_such_flag"
    ]
    assert unknown_flags("`python benchmarks/bench.py --no_such_flag`") == ["--no_such_flag"]
    assert unknown_flags("`--report_dir` alone") == ["--report_dir"]
    assert unknown_flags("`python -m retrain --no-report --seed 1`") == []
    assert unknown_make_targets("```\nmake no-such-target\n```") == ["no-such-target"]
    assert broken_links("[x](docs/nowhere.md) [y](#no-such-heading)", README) == [
        "docs/nowhere.md",
        "#no-such-heading",
    ]
    assert missing_source_paths("`retrain/no_such_module.py`") == ["retrain/no_such_module.py"]
