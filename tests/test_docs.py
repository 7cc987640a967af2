"""The documentation a researcher reads: no words of our own tracker or machines, short stage references with
their measurements in docs/notes/, and every relative link (anchors included) resolving."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import click
import pytest

from featcache.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: the stage references: what a user reads to run a stage, in a few minutes
STAGE_PAGES = ["extract.md", "evaluate.md", "train-gate.md", "distill.md", "pipelines.md", "demo.md"]
MAX_WORDS = 1500

#: words that point at our tracker or at how our machines were provisioned: a user can look none of them up.
#: "lent" is matched as a word (it is inside "silently", "equivalent"); "session" anywhere, case-insensitive.
INTERNAL = [r"issues? ?#?[0-9]", r"\blent\b", r"not drawn", r"session", r"\.\./shared", r"closing note", r"\bthe issue\b",
            r"\bacceptance\b", r"device `?status`?"]
#: the legitimate uses, each with why
ALLOWED = {
    r"session-scoped fixtures": "pytest's fixture scope (docs/development.md)",
    r"InferenceSession": "ONNX Runtime's class name",
}


def internal_words(text: str) -> list[str]:
    """Each internal reference in ``text``, with the words around it, after removing the allowed uses."""
    for allowed in ALLOWED:
        text = re.sub(allowed, "", text, flags=re.IGNORECASE)
    found = []
    for pattern in INTERNAL:
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            found.append(text[max(0, m.start() - 40):m.end() + 40].replace("\n", " "))
    return found


def test_the_internal_patterns_catch_what_they_are_for():
    """The check itself: each pattern finds its example, the allowlist spares only what it names."""
    for example in ("see issue 21", "Issues 3 and 4", "no GPU was lent", "device status: not drawn",
                    "a second session", "in ../shared/data", "the issue asks", "against the acceptance"):
        assert internal_words(example), example
    for fine in ("silently", "an equivalent run", "session-scoped fixtures", "ort.InferenceSession", "drawn from a normal"):
        assert not internal_words(fine), fine


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_page_has_no_internal_reference(page):
    found = internal_words(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}: {found}"


def _help_texts() -> dict[str, str]:
    """``featcache --help`` and every command's (and subcommand's) ``--help``, as a user sees them."""
    from click.testing import CliRunner

    out, todo = {}, [()]
    runner = CliRunner()
    while todo:
        path = todo.pop()
        res = runner.invoke(main, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        out[" ".join(("featcache", *path))] = res.output
        cmd = main
        for name in path:
            cmd = cmd.get_command(None, name)
        if isinstance(cmd, click.Group):
            todo += [(*path, name) for name in cmd.list_commands(None)]
    return out


def test_no_cli_help_text_has_an_internal_reference():
    texts = _help_texts()
    assert len(texts) > 10  # every command, not just the group
    bad = {name: internal_words(text) for name, text in texts.items() if internal_words(text)}
    assert not bad, bad


#: runs each benchmark script with --help in one interpreter (torch imported once), printing {script: text}
_BENCH_HELP = r"""
import contextlib, io, json, os, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf, env = io.StringIO(), dict(os.environ)
    sys.argv = [script, "--help"]
    sys.path.insert(0, os.path.dirname(script))  # as when the script runs: its folder first on the path
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    os.environ.clear(); os.environ.update(env)
    out[script] = [code, buf.getvalue()]
print("\n" + json.dumps(out))
"""


@pytest.mark.heavy
def test_no_benchmark_help_text_has_an_internal_reference():
    scripts = sorted(str(p) for p in (ROOT / "benchmarks").glob("*.py"))
    res = subprocess.run([sys.executable, "-c", _BENCH_HELP, *scripts], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    texts = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(texts) == scripts
    for script, (code, text) in texts.items():
        assert code == 0 and "usage:" in text, f"{script} --help: exit {code}, printed {text[:300]!r}"  # help, never a run
        assert not internal_words(text), f"{script} --help: {internal_words(text)}"


def _words(page: Path) -> int:
    text = re.sub(r"<!--.*?-->", "", page.read_text(), flags=re.DOTALL)
    return len(text.split())


@pytest.mark.parametrize("name", STAGE_PAGES)
def test_a_stage_reference_reads_in_a_few_minutes(name):
    words = _words(ROOT / "docs" / name)
    assert words <= MAX_WORDS, f"docs/{name}: {words} words; move measurements and history to docs/notes/"


def test_measurements_live_in_dated_notes():
    notes = sorted((ROOT / "docs" / "notes").glob("*.md"))
    assert len(notes) >= 3
    for note in notes:
        title = note.read_text().splitlines()[0]
        assert title.startswith("# ") and re.search(r"20\d\d-\d\d-\d\d", title), f"{note.name}: a dated title, got {title!r}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFC", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: dict[str, int] = {}
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = anchor(line.lstrip("#"))
        n = out.get(base, 0)
        out[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_anchor_matches_github():
    assert anchor("Recipes: `routed` (the default) and `paper`") == "recipes-routed-the-default-and-paper"
    assert anchor("Evaluation against the bare product (target ≤ 1.2×)") == "evaluation-against-the-bare-product-target--12"
    assert anchor("Losses: how featcache reads Eq. 10–16") == "losses-how-featcache-reads-eq-1016"


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, frag = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            bad.append(f"{link}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{link}: no heading with that anchor in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


def test_no_page_cites_itself_by_path():
    for page in PAGES:
        rel = str(page.relative_to(ROOT))
        assert f"`{rel}`" not in page.read_text() and f" {rel} " not in page.read_text(), rel
