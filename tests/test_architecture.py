"""The tree shows the architecture: imports point down the layers without circles, and the docs name
what exists (modules, mixins, tools, the hook and stage tables)."""

import ast
import re
from pathlib import Path

import pytest

from sat_video.model.hooks import hook_table_markdown
from sat_video.model.stages import stage_table_markdown
from tests.conftest import ROOT

# Bottom to top (docs/architecture.md). A module may import its own layer and those below it.
LAYERS = [
    "sat_video.common", "sat_video.model", "mixins", "sat_video.model.build", "sat_video.data", "sat_video.fixtures",
    "sat_video.diffusion", "sat_video.formats", "sat_video.training", "sat_video.vae_training", "sat_video.config",
    "sat_video.benchmarks", "sat_video.experiments", "sat_video.gpu_check",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for folder in ("sat_video", "mixins") for path in sorted((ROOT / folder).rglob("*.py"))
           if path != ROOT / "sat_video" / "__init__.py"}  # the public API re-exports from the layers; nothing imports it


def _layer(module: str) -> int:
    matches = [index for index, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer; add it to LAYERS and docs/architecture.md"
    return max(matches, key=lambda index: len(LAYERS[index]))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported project module, type-only)`` for every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for stmt in block.body for node in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [name for name in names if name in MODULES] or [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(target, id(node) in type_only) for target in targets if target.split(".")[0] in ("sat_video", "mixins")]
    return found


def test_imports_point_down_the_layers():
    upward = []
    for module, path in MODULES.items():
        for target, _ in _imports(path):
            assert target != "sat_video", f"{module} imports the sat_video facade; import from the layer instead"
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)]}) imports {target} ({LAYERS[_layer(target)]})")
    assert not upward, "\n".join(upward)


TYPES_COUNT_INSIDE = "sat_video.model"
"""Inside this package a type-only import counts too: its modules name each other's types in every signature, and a
circle of type-only imports there (context -> composition -> hooks -> config -> context) once tangled the whole layer."""


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_circles_beyond_type_only_imports():
    graph = {module: {target for target, type_only in _imports(path) if target in MODULES and (
                 not type_only or _inside(module, TYPES_COUNT_INSIDE) and _inside(target, TYPES_COUNT_INSIDE))}
             for module, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(module, stack):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


SCRIPT_FOLDERS = ("tools", "benchmarks")
"""Folders of scripts above the library. A module that starts one by path depends upward where no import shows it: the
tools hand such commands down instead (``sat_video.benchmarks.context.Commands``)."""


def _script_paths(source: str) -> list[str]:
    """String literals of ``source``'s code (docstrings aside) that build a path to a script of ``SCRIPT_FOLDERS``:
    the folder as a path part (``ROOT / "tools" / ...``), a tool's file name, or a path such as ``tools/x.py``. Prose
    that names a tool (``"run tools/precompute_latents.py first"``) has spaces and is no path."""
    scripts = {path.name for path in (ROOT / "tools").glob("*.py")}
    tree = ast.parse(source)
    docstrings = {id(statement.value) for statement in ast.walk(tree)
                  if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)}
    path = re.compile(rf"(\S*/)?({'|'.join(SCRIPT_FOLDERS)})/\S*\.py")
    return sorted(node.value for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and (node.value in SCRIPT_FOLDERS or node.value in scripts or path.fullmatch(node.value)))


def test_no_module_starts_a_script_above_the_library():
    found = {module: paths for module, path in MODULES.items() if (paths := _script_paths(path.read_text()))}
    assert not found, f"modules that build paths to scripts of {SCRIPT_FOLDERS} (take the command from the tool): {found}"


def test_the_script_check_sees_paths_and_not_prose():
    assert _script_paths('command = [sys.executable, str(ROOT / "tools" / "train_video.py")]') == ["tools", "train_video.py"]
    assert _script_paths('subprocess.run(["python", "benchmarks/diffusers_lora/run_timed.py"])') == [
        "benchmarks/diffusers_lora/run_timed.py"]
    assert _script_paths('"""Runs ``tools/train_video.py``."""\nraise ValueError("run tools/precompute_latents.py first")') == []


def _layout_section() -> str:
    return ROOT.joinpath("docs", "architecture.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_the_layout_in_the_docs_names_every_module_mixin_and_tool():
    """Each ``<folder>/`` line of the layout block lists exactly the ``.py`` files of that folder."""
    listed: dict[str, set[str]] = {}
    folder = None
    for line in _layout_section().splitlines():
        heading = re.match(r"^((?:sat_video/\w+|mixins|tools)/)\s", line)
        if heading:
            folder = heading.group(1).rstrip("/")
        elif not line.startswith(" "):
            folder = None
        if folder:
            listed.setdefault(folder, set()).update(re.findall(r"\b(\w+)\.py\b", line))
    expected = {str(path.relative_to(ROOT)): {p.stem for p in path.glob("*.py") if p.name != "__init__.py"}
                for path in [*(ROOT / "sat_video").iterdir(), ROOT / "mixins", ROOT / "tools"]
                if path.is_dir() and any(path.glob("*.py"))}
    assert listed == expected


def test_the_hook_and_stage_tables_in_the_docs_are_the_catalogues():
    document = "docs/mixins.md"  # the one written copy: other pages link to it
    text = ROOT.joinpath(document).read_text()
    for table, source in (
        (hook_table_markdown(), "sat_video/model/hooks.py"),
        (stage_table_markdown(), "sat_video/model/stages.py"),
    ):
        assert table in text, f"{document}: the table generated from {source} has drifted; paste this in:\n{table}"


MACHINE_FOLDER = re.compile(r"(?<![\w.~])(?:/home/|/root/|/work/|/Users/|[A-Za-z]:\\Users\\)")
"""The start of a path that exists on one machine only: a user's home or a work folder (``~`` is anyone's home)."""


def test_no_file_names_a_folder_of_one_machine():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for folder in ("sat_video", "mixins", "tools", "configs", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*")) if path.suffix in (".py", ".yaml", ".md", ".txt", ".json")
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if MACHINE_FOLDER.search(line)]
    assert not found, "paths of one machine (take them from a flag or an environment variable):\n" + "\n".join(found)
