"""The package structure docs/architecture.md describes: no import cycle between featcache's packages, every
unit importing only what the doc allows it, and the narrower rules it marks (tested)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "featcache"


def unit_of(module: str) -> str | None:
    """featcache.X.Y -> 'X' (a subpackage or a top-level module); None outside featcache."""
    parts = module.split(".")
    if parts[0] != "featcache":
        return None
    return parts[1] if len(parts) > 1 else "featcache"


def import_graph() -> dict[str, set[str]]:
    """Unit -> units it imports, counting imports anywhere in a file (function-level ones too)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = unit_of(module)
        deps = graph.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                u = unit_of(t)
                if u and u not in (here, "featcache"):
                    deps.add(u)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert {"cache", "evaluation", "gate", "training", "extract", "cli"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_module_graph_sees_both_import_forms(tmp_path, monkeypatch):
    pkg = tmp_path / "featcache" / "p"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import featcache.p.b\n")
    (pkg / "b.py").write_text("def f():\n    from featcache.p.a import x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "featcache")
    assert find_cycle(module_graph("p")) in (["a", "b", "a"], ["b", "a", "b"])


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


BASE = {"errors", "registry", "config", "runtime", "processes", "progress", "fileio", "faults", "preprocess", "__version__"}
DATA = {"datasets", "cache", "backbones"}
STAGES = {"extract", "evaluation", "training", "gate", "distill", "standins", "embed", "pipeline"}
# What each unit may import, as docs/architecture.md states it; a new unit must be placed here to pass.
ALLOWED = {
    **{b: BASE for b in BASE},
    "datasets": BASE,
    "cache": BASE | {"datasets"},
    "backbones": BASE | {"cache"},           # cache.spec only: checked below
    "extract": BASE | DATA,
    "evaluation": BASE | DATA,               # no training stage by name: they register their kinds
    "training": BASE,
    "gate": BASE | DATA | {"training", "evaluation"},
    "distill": BASE | DATA | {"training", "evaluation", "gate"},  # gate in profile only: checked below
    "standins": BASE | {"backbones", "training", "synth_render"},
    "embed": BASE | DATA | {"extract", "evaluation", "training"},  # a trained run as extraction's one backbone
    "pipeline": BASE | DATA | STAGES | {"synth", "synth_render", "synth_cache"},
    "cli": BASE | DATA | STAGES | {"synth", "synth_render", "synth_cache", "api"},
    "__main__": {"cli"},
    "featcache": {"api", "errors"},
    "api": BASE | {"cache", "evaluation", "training"},  # training: RunDir says which stage made a run
    "synth_render": set(),
    "synth": BASE | {"synth_render"},
    "synth_cache": BASE | {"cache", "datasets"},
    "pipelines": set(),                      # data: the bundled pipeline files
}


def test_layers():
    """Every unit imports only what docs/architecture.md allows it; only the CLI wires the stages."""
    graph = import_graph()
    unplaced = sorted(set(graph) - set(ALLOWED))
    assert not unplaced, f"place {unplaced} in ALLOWED (and in docs/architecture.md)"
    wrong = {u: sorted(deps - ALLOWED[u]) for u, deps in graph.items() if deps - ALLOWED[u]}
    assert not wrong, f"imports against docs/architecture.md: {wrong}"
    assert "gate" in graph["cli"] and not any("cli" in deps for u, deps in graph.items() if u not in ("__main__",))


def imports_of(path: Path) -> set[str]:
    """Every featcache module a file imports (function-level imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("featcache")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featcache"):
            out.add(node.module)
    return out


def test_the_narrow_imports_the_doc_states():
    """backbones reads only cache.spec of the cache; of gate, distill reads only in profile; nothing but the CLI
    imports pipeline."""
    for path in (PKG / "backbones").rglob("*.py"):
        assert {m for m in imports_of(path) if m.startswith("featcache.cache")} <= {"featcache.cache.spec"}, path
    for path in (PKG / "distill").glob("*.py"):
        if path.stem != "profile":
            assert not {m for m in imports_of(path) if m.startswith("featcache.gate")}, path
    for path in PKG.rglob("*.py"):
        if path.parent.name not in ("pipeline", "cli"):
            assert not {m for m in imports_of(path) if m.startswith("featcache.pipeline")}, path


def module_graph(package: str) -> dict[str, set[str]]:
    """Within featcache.<package>: module -> the package's modules it imports (function-level imports too; the
    package's __init__, which re-exports, left out)."""
    root = PKG / package
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            mods: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):  # `import featcache.pkg.mod` counts too
                mods = [a.name for a in node.names]
            if mods:
                for m in mods:
                    parts = m.split(".")
                    if parts[:2] == ["featcache", package] and len(parts) > 2 and parts[2] in names and parts[2] != name:
                        deps.add(parts[2])
    return graph


def test_no_import_cycle_between_the_cache_modules():
    """store, checksum and shards once imported each other in a loop (issue 23): the format's base is fileformat."""
    graph = module_graph("cache")
    assert {"store", "checksum", "shards", "fileformat"} <= set(graph) and graph["fileformat"] <= {"lock"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_doc_names_every_module():
    """docs/architecture.md lists every module: a top-level one as `name.py`, a package's as `name` in the
    package's own entry (from its `package/` bullet to the next top-level bullet)."""
    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    missing = [f"{p.name}" for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__", "__version__")
               and f"`{p.name}`" not in doc]
    for package in sorted(p for p in PKG.iterdir() if (p / "__init__.py").is_file()):
        start = doc.find(f"- `{package.name}/`")
        if start < 0:
            missing.append(f"{package.name}/")
            continue
        end = doc.find("\n- ", start + 1)
        entry = doc[start:end if end > 0 else len(doc)]
        missing += [f"{package.name}/{p.name}" for p in sorted(package.glob("*.py"))
                    if p.stem != "__init__" and f"`{p.stem}`" not in entry and f"`{p.stem}.py`" not in entry]
    assert not missing, "not in docs/architecture.md: " + ", ".join(missing)


def test_no_import_cycle_inside_any_package():
    """docs/architecture.md: within each package too, modules import in one direction (TYPE_CHECKING and
    function-level imports count: a loop a reader sees is a loop)."""
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert {"cache", "evaluation", "gate", "distill", "cli", "training", "extract", "pipeline"} <= set(packages)
    for package in packages:
        cycle = find_cycle(module_graph(package))
        assert cycle is None, f"import cycle in featcache.{package}: " + " -> ".join(cycle)


def test_only_the_cache_package_touches_hdf5():
    """Stages read and write featcache's files through ``featcache.cache`` (issue 23): no module outside it imports
    h5py or opens a file with ``open_cache_file`` (which hands out the raw h5py.File), so none names a path inside one."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.parent.name == "cache" and path.parent.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                internal = node.module.startswith("featcache.cache")  # featcache.api.open_cache is the public reader
                names = [node.module] + [a.name for a in node.names if internal]
            bad = [n for n in names if n.split(".")[0] == "h5py" or n in ("open_cache_file", "read_checked", "read_rows")]
            if bad:
                offenders.append(f"{path.relative_to(PKG.parent)}: {', '.join(bad)}")
    assert not offenders, "outside featcache.cache: " + "; ".join(offenders)


def test_the_readme_front_page_stays_short_and_keeps_its_two_commands():
    """Issue 24: a front page a newcomer reads in five minutes; the set-up commands CI and users rely on."""
    readme = (PKG.parent / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert marker in readme
    assert ".venv/bin/featcache demo" in readme and '.venv/bin/python -m pytest -q -n 2 --maxschedchunk 1 -m "not slow"' in readme
    for page in ("docs/README.md", "LICENSE", "CITATION.cff"):
        assert (PKG.parent / page).is_file(), page


#: the file names of a run folder (featcache.training.rundir); a module that spells one bypasses RunDir
RUN_FILES = ("config.yaml", "run.json", "log.csv", "model.safetensors", "val.json", "gate_stats.json")
#: where spelling one is right: rundir itself; the backbones' own Hugging Face file names (not a run's);
#: bit_equality.py, which must read the run folders of older featcache versions without this one's RunDir
RUN_FILE_ALLOWED = ("featcache/training/rundir.py", "featcache/backbones/", "benchmarks/bit_equality.py")


def run_file_names(path: Path) -> list[str]:
    """The string constants of a module (docstrings aside) that spell a run-folder file name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [f"{path.name}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
            and any(n.value == f or n.value.startswith(f"/{f}") for f in RUN_FILES)]  # a name, or joined onto a path


def test_only_rundir_spells_the_run_folder_files():
    """Stages and benchmarks reach a run's files through ``RunDir`` (``weights_file``, ``log_rows``, ``val``, ...)."""
    root = PKG.parent
    offenders = []
    for path in sorted([*PKG.rglob("*.py"), *(root / "benchmarks").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if not any(rel.startswith(a) for a in RUN_FILE_ALLOWED):
            offenders += run_file_names(path)
    assert not offenders, "outside training/rundir.py: " + "; ".join(offenders)


def test_the_run_file_check_finds_a_spelled_name(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text('"""Reads log.csv (a docstring may say so)."""\nrows = open(run / "log.csv")\nf"{run}/model.safetensors"\n')
    bad.write_text('"""Reads log.csv (a docstring may say so)."""\nrows = open(run / "log.csv")\nf"{run}/model.safetensors"\n'
                   'raise ValueError("recorded in its run.json")  # a message may name the file to the user\n')
    assert sorted(x.split(": ", 1)[1] for x in run_file_names(bad)) == ["'/model.safetensors'", "'log.csv'"]


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    """The string constants of a module, docstrings aside (f-strings' literal parts included)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def hdf5_vocabulary() -> tuple[set[str], set[str]]:
    """(groups, attributes) of featcache's HDF5 files as the cache package spells them: the first segment of every
    path it writes with a slash ("images/status", f"backbones/{b}/..."), and every name it indexes ``.attrs`` with."""
    groups: set[str] = set()
    attrs: set[str] = set()
    for path in (PKG / "cache").glob("*.py"):
        tree = ast.parse(path.read_text())
        for n in _string_constants(tree):
            head = n.value.split("/")[0]
            if "/" in n.value and head.isidentifier():
                groups.add(head)
        for n in ast.walk(tree):
            key = None
            if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Attribute) and n.value.attr == "attrs":
                key = n.slice
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" \
                    and isinstance(n.func.value, ast.Attribute) and n.func.value.attr == "attrs" and n.args:
                key = n.args[0]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                attrs.add(key.value)
    return groups, attrs


#: attribute names that are also words of other files (a run's run.json, the ONNX metadata, the cache's identity
#: as JSON): spelled outside the cache package for those, never to index an HDF5 file (no module there can: above)
SHARED_WORDS = {"rows", "doc", "tokens", "experts", "run", "kind", "image_size", "identity", "cache", "outputs",
                "cache_identity", "featcache_version"}


def hdf5_names_in(path: Path, groups: set[str], attrs: set[str]) -> list[str]:
    """The string constants of a module that spell an HDF5 path of a cache group, or a cache or teacher-targets
    attribute that is no other file's word."""
    return [f"{path.name}:{n.lineno}: {n.value!r}" for n in _string_constants(ast.parse(path.read_text()))
            if ("/" in n.value and n.value.split("/")[0] in groups) or (n.value in attrs - SHARED_WORDS)]


def test_only_the_cache_package_spells_hdf5_names():
    """Group paths ("images/status") and attribute names ("format_version") of the cache and the teacher targets
    live in ``featcache/cache/``: other modules use the reader's and writer's methods."""
    groups, attrs = hdf5_vocabulary()
    assert {"images", "views", "backbones"} <= groups and {"format_version", "weights_digest", "shards"} <= attrs
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path.parent != PKG / "cache":
            offenders += hdf5_names_in(path, groups, attrs)
    assert not offenders, "outside featcache/cache: " + "; ".join(offenders)


def test_the_hdf5_name_check_finds_a_spelled_name(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text('"""Reads images/status (a docstring may say so)."""\nx = f["images/status"]\ny = f.attrs["format_version"]\n'
                   'z = meta["cache_identity"]\nw = f"backbones/{name}/pooled"\n')
    groups, attrs = hdf5_vocabulary()
    assert sorted(x.split(": ", 1)[1] for x in hdf5_names_in(bad, groups, attrs)) == ["'backbones/'", "'format_version'", "'images/status'"]


def test_no_caller_tells_errors_apart_by_their_wording():
    """A caller that must tell one cache error from another catches its type (``EmptySplit``, ``CacheBusy``,
    ``NotResumable``), not a phrase of its message, which may be reworded for users at any time."""
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In)
                    and isinstance(node.left, ast.Constant) and isinstance(node.comparators[0], ast.Call)
                    and getattr(node.comparators[0].func, "id", "") == "str"
                    and path.name != "fileformat.py"):  # h5py's own OSError wording, the one it gives
                offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not offenders, "message wording tested at " + ", ".join(offenders)


def test_one_helper_refuses_a_value_outside_its_choices():
    """``errors.check_choice`` writes every "expected one of" message; no module writes its own."""
    import pytest

    from featcache.errors import ConfigError, InputError, check_choice

    check_choice("sort", ("auto", "sort"), "--ranking")
    with pytest.raises(ConfigError, match=r"^--ranking 'gpu': expected one of auto, sort$"):
        check_choice("gpu", ("auto", "sort"), "--ranking")
    with pytest.raises(InputError, match=r"^ranking='gpu': expected one of auto, sort \(none on a GPU\)$"):
        check_choice("gpu", ("auto", "sort"), "ranking", InputError, what="ranking='gpu'", note=" (none on a GPU)")
    hand_written = [f"{p.relative_to(PKG.parent)}" for p in PKG.rglob("*.py")
                    if p.name != "errors.py" and "expected one of" in p.read_text()]
    assert not hand_written, hand_written
