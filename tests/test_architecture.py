"""The house as docs/ARCHITECTURE.md draws it: imports flow one way, there are no cycles, methods register
themselves. Read from the source with ``ast`` (every import, also inside functions), nothing is imported."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import softprompts as sp

PACKAGE = Path(sp.__file__).resolve().parent

# ground floor first; a module may import its own floor and those below (docs/ARCHITECTURE.md, "The layers")
LAYERS = [
    ("errors", "files", "third_party_logs"),
    ("model",),
    ("methods",),
    ("data", "task_spec"),
    ("schema", "codec", "adapter", "adapter_io", "table", "compose", "tasks"),
    ("metrics", "evaluate", "explain"),
    ("training",),
    ("interop", "compare", "serve", "demo"),
    ("workflow", "api"),
    ("cli", "__main__", "__init__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> package modules it imports`` (absolute and relative, top level and inside functions)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in candidates:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):  # own package face: ignored
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def floor(module: str) -> int:
    top = module.removeprefix("softprompts").lstrip(".").split(".")[0] or "__init__"
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is on no floor of LAYERS: add it here and to docs/ARCHITECTURE.md")


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_flow_one_way():
    upward = [f"{m} (floor {floor(m)}) -> {t} (floor {floor(t)})"
              for m, targets in import_graph().items() for t in targets if floor(t) > floor(m)]
    assert upward == []


def test_the_architecture_page_names_every_floor():
    text = (PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for names in LAYERS:
        for name in names:
            if name not in ("__main__", "__init__"):
                assert f"`{name}" in text, name


@pytest.mark.parametrize("name", list(sp.METHODS))
def test_a_method_declares_everything_on_its_class(name):
    cls = sp.METHODS[name]
    config = cls.config_class()
    assert not config.errors() and cls.default_lr > 0 and cls.artifact_kind in sp.model.artifacts.KINDS
    assert all(sp.methods.method_class(alias) is cls for alias in (name, *cls.aliases))
    source = Path(inspect.getsourcefile(cls))
    assert source.parent == PACKAGE / "methods" and len(source.read_text().splitlines()) < 200


def test_one_function_builds_the_chat_stop_tokens():
    """The chat stop rule is ``tasks.turn_stop_ids``: outside ``data/chat.py`` (which defines the end of turn) no
    module but ``tasks`` reads it, in ``tasks.py`` only that function does, and nothing else in either asks for the
    model's end of sequence. A fourth copy of the rule fails here."""
    readers = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                     if any(isinstance(node, ast.Attribute) and node.attr in ("end_of_turn", "end_of_turn_parts")
                            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))))
    assert readers == ["softprompts.data.chat", "softprompts.tasks"]

    def functions_using(path: Path, names: set[str]) -> list[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return sorted(f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and any(
            (isinstance(n, ast.Name) and n.id in names) or (isinstance(n, ast.Attribute) and n.attr in names)
            for n in ast.walk(f)))

    assert functions_using(PACKAGE / "tasks.py", {"eos_ids", "end_of_turn", "end_of_turn_parts"}) == ["turn_stop_ids"]
    assert functions_using(PACKAGE / "data" / "chat.py", {"eos_ids"}) == []


SHARED_CLI = {"softprompts.cli.arguments", "softprompts.cli.task_inputs"}  # flag types and flags every command uses


def cli_crossings(sources: dict[str, str]) -> list[str]:
    """The imports between ``cli/`` modules (``{module: source}``) that break the CLI's rule: a command (a module with
    ``register``) imports no other command; a module that is not shared (``SHARED_CLI``) and not a command is one
    command's part (``cli/cartridge.py`` is ``train``'s flags, ``cli/serve_vllm.py`` is ``serve``'s launch) and is
    imported by that one module only."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    commands = {name for name, tree in trees.items()
                if any(isinstance(f, ast.FunctionDef) and f.name == "register" for f in tree.body)}
    imports = {name: {t for t in imported_modules(tree, set(trees)) if t != name} for name, tree in trees.items()}
    found = [f"{m} -> {t} (a command)" for m, targets in imports.items() for t in targets if t in commands]
    for part in set(trees) - commands - SHARED_CLI - {"softprompts.cli"}:
        owners = sorted(m for m, targets in imports.items() if part in targets)
        if len(owners) > 1:
            found.append(f"{', '.join(owners)} -> {part} (one command's part)")
    return sorted(found)


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``tree`` imports (``import a.b``, ``from a.b import c``, ``from a import b``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} & modules | {f"{node.module}.{a.name}" for a in node.names} & modules
    return found


def private_imports(tree: ast.AST, own: str) -> list[str]:
    """``module._name`` for each private name ``tree`` (the module ``own``) takes from another package module:
    ``from softprompts.x import _name``, or ``x._name`` on a module it imported."""
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("softprompts") and node.module != own:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("softprompts")})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != own):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def cli_sources() -> dict[str, str]:
    return {module_name(p): p.read_text(encoding="utf-8") for p in (PACKAGE / "cli").glob("*.py")}


def test_no_command_imports_another_command():
    """A CLI command (a ``cli/`` module with ``register``) is its arguments plus one call below the CLI: what two
    commands share lives in ``workflow/`` or a shared ``cli/`` module (``SHARED_CLI``), never in another command or
    in a part of another command."""
    assert cli_crossings(cli_sources()) == []
    broken = dict(cli_sources())  # generate borrowing eval's task loader, tune borrowing train's corpus flags
    broken["softprompts.cli.generate"] += "\nfrom softprompts.cli.evaluate import TASK_FLAGS\n"
    broken["softprompts.cli.tune"] += "\nfrom softprompts.cli import cartridge\n"
    assert cli_crossings(broken) == ["softprompts.cli.generate -> softprompts.cli.evaluate (a command)",
                                     "softprompts.cli.train, softprompts.cli.tune -> softprompts.cli.cartridge "
                                     "(one command's part)"]


def test_the_command_line_imports_no_private_name():
    """The CLI takes only public names from the package (``workflow/``'s functions, flag helpers): no ``_helper`` of
    another command or of a module below."""
    found = {m: private_imports(ast.parse(text), m) for m, text in cli_sources().items()}
    assert {m: names for m, names in found.items() if names} == {}
    legacy = ("from softprompts.cli.evaluate import _subject\nimport softprompts.cli.train as train\n"
              "def run(args):\n    return train._base(args), _subject(args)\n")
    assert private_imports(ast.parse(legacy), "softprompts.cli.generate") == [
        "softprompts.cli.evaluate._subject", "softprompts.cli.train._base"]


FAMILIES = ("softprompts.model.decoder", "softprompts.model.encoder_decoder")


def test_only_the_model_layer_imports_the_injection_point():
    """How an artifact enters the model is ``model/``'s business: everything above asks the family
    (``FrozenBase.token_logits``, ``hidden_at``, ``prefill``, ...) and takes ``VirtualContext`` from the artifacts."""
    graph = import_graph()
    outside = sorted(m for m, targets in graph.items()
                     if "softprompts.model.decoder.inject" in targets and not m.startswith("softprompts.model"))
    assert outside == []


def test_each_family_keeps_its_internals_in_its_own_subpackage():
    """A family's internals (injection, decode loop, cache, scores) live under ``model/decoder/`` or
    ``model/encoder_decoder/``; above ``model/`` only the family's face (``BaseModel``, ``EncoderDecoderBase``,
    ``sp.forward``) is imported, and neither family imports the other's internals: what both need (the artifacts,
    the decode-loop skeleton, placement, padding, the fused head) sits in ``model/`` itself."""
    graph = import_graph()
    reached_inside = sorted((m, t) for m, targets in graph.items() for t in targets
                            if t.startswith(tuple(f + "." for f in FAMILIES)) and not m.startswith("softprompts.model"))
    assert reached_inside == []
    crossed = sorted((m, t) for m, targets in graph.items() for t in targets for own in FAMILIES for other in FAMILIES
                     if own != other and (m == own or m.startswith(own + "."))
                     and (t == other or t.startswith(other + ".")))
    assert crossed == []
    shared = {m for m in graph if m.startswith("softprompts.model.") and not m.startswith(FAMILIES)}
    assert not {t for m in shared - {"softprompts.model.load"} for t in graph[m] if t.startswith(FAMILIES)}, (
        "a shared model/ module imports a family: only load.py (which picks the family) may")
    assert {"softprompts.model.decoder.inject", "softprompts.model.encoder_decoder.forward"} <= set(graph)


def test_the_command_line_parser_loads_without_torch():
    """``softprompts --help`` stays fast: building every command's parser imports no torch (the commands import
    their work when they run)."""
    code = "import sys; from softprompts.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


DOCUMENT_NAMES = {"CONFIG_FILE", "TABLE_CONFIG", "ADAPTER_FILE", "TABLE_FILE", "adapter.json", "table.json"}
JSON_READERS = {"read_json", "parse_json", "read_json_or_none"}  # files.py's, and json.load / json.loads


def parses_json(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "json":
        return func.attr in ("load", "loads")
    return getattr(func, "id", None) in JSON_READERS or getattr(func, "attr", None) in JSON_READERS


def document_readers(tree: ast.AST) -> list[str]:
    """Functions of ``tree`` that parse JSON and name ``adapter.json`` or ``table.json`` (a constant or a string)."""
    found = []
    for f in ast.walk(tree):
        if not isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        nodes = list(ast.walk(f))
        names = any((isinstance(n, ast.Name) and n.id in DOCUMENT_NAMES)
                    or (isinstance(n, ast.Attribute) and n.attr in DOCUMENT_NAMES)
                    or (isinstance(n, ast.Constant) and n.value in DOCUMENT_NAMES) for n in nodes)
        parses = any(parses_json(n) for n in nodes)
        if names and parses:
            found.append(f.name)
    return found


def test_only_the_codec_reads_adapter_and_table_documents():
    """``adapter.json`` and ``table.json`` are parsed in ``codec.py`` only, into typed records: no other module has
    a function that parses JSON and names either file (the server, the CLI and interop read the records)."""
    readers = {module_name(p): document_readers(ast.parse(p.read_text(encoding="utf-8")))
               for p in PACKAGE.rglob("*.py")}
    assert {m: f for m, f in readers.items() if f and m != "softprompts.codec"} == {}
    codec = ast.parse((PACKAGE / "codec.py").read_text(encoding="utf-8"))
    assert any(parses_json(n) for n in ast.walk(codec))  # the codec is where the parsing is
    legacy = "def f(path):\n    return json.loads((path / TABLE_CONFIG).read_text())['tasks']\n"
    assert document_readers(ast.parse(legacy)) == ["f"]


CODEC_MODULES = {"softprompts.codec", "softprompts.adapter_io", "softprompts.table"}
ADAPTER_FILES = DOCUMENT_NAMES | {"WEIGHTS_FILE", "TABLE_WEIGHTS", "adapter.safetensors", "table.safetensors"}
FILE_READS = {"load", "load_file", "safe_open", "read_files", "read_bytes", "read_text", "open"} | JSON_READERS


def file_openers(tree: ast.AST) -> list[str]:
    """Functions of ``tree`` that read an adapter's or a table's file (``adapter.json`` / ``adapter.safetensors``,
    ``table.json`` / ``table.safetensors``, by constant or string): a read call (JSON, safetensors, bytes or text)
    whose receiver or arguments name the file, directly or through a variable assigned from it. Looking at one
    (``is_file``, ``stat``) is not reading it."""

    def names_file(node: ast.AST, paths: set[str]) -> bool:
        return any((isinstance(n, ast.Name) and (n.id in ADAPTER_FILES or n.id in paths))
                   or (isinstance(n, ast.Attribute) and n.attr in ADAPTER_FILES)
                   or (isinstance(n, ast.Constant) and n.value in ADAPTER_FILES) for n in ast.walk(node))

    found = []
    for f in ast.walk(tree):
        if not isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        paths: set[str] = set()  # variables holding such a file's path
        for n in ast.walk(f):
            if isinstance(n, ast.Assign) and names_file(n.value, paths):
                paths |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        if any(isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) in FILE_READS
               and names_file(ast.Tuple([n.func, *n.args, *(k.value for k in n.keywords)]), paths)
               for n in ast.walk(f)):
            found.append(f.name)
    return found


def test_only_the_codec_opens_adapter_and_table_files():
    """An adapter's and a table's files (document and tensors) are read by the codec modules alone: ``codec.py``
    parses the documents, ``adapter_io.py`` and ``table.py`` read the tensors beside them (with the checks every
    reader makes, ``adapter_io.checked_artifact``). Everyone else calls ``load_adapter``, ``PromptTable.load`` or
    ``read_*_record``; the server's registry may look at the files (``stat``) to see a change, not read them."""
    readers = {module_name(p): file_openers(ast.parse(p.read_text(encoding="utf-8"))) for p in PACKAGE.rglob("*.py")}
    assert {m: f for m, f in readers.items() if f and m not in CODEC_MODULES} == {}
    assert readers["softprompts.adapter_io"] and readers["softprompts.table"]  # where the reading is
    legacy = ("from safetensors.torch import load_file\n"
              "def weights(path):\n    return load_file(str(path / WEIGHTS_FILE))\n"
              "def document(path):\n    config = path / 'table.json'\n    return json.loads(config.read_text())\n"
              "def changed(path):\n    record = json.loads((path / 'training.json').read_text())\n"
              "    return record, (path / TABLE_WEIGHTS).stat().st_mtime_ns\n")
    assert file_openers(ast.parse(legacy)) == ["weights", "document"]


TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"
PATH_LOADERS = {"insert", "append", "extend", "spec_from_file_location", "SourceFileLoader", "run_path"}


def benchmark_imports(tree: ast.AST, benchmarks: set[str]) -> list[str]:
    """What ``tree`` takes from ``benchmarks/``: an import of one of its modules (``benchmarks`` names them by their
    stem, as ``sys.path`` would), or a call that puts a path naming ``"benchmarks"`` on ``sys.path`` or loads a module
    from it. Running a benchmark as a script (``subprocess``) is not taking from it: that tests the benchmark."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in benchmarks]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in benchmarks:
            found.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in PATH_LOADERS:
            if any(isinstance(n, ast.Constant) and n.value == "benchmarks" for n in ast.walk(node)):
                found.append(ast.unparse(node))
    return found


def test_tests_do_not_import_from_benchmarks():
    """The tests stand on the package and ``tests/`` only: what a test needs lives in ``src/`` (product logic) or in
    a ``tests/`` helper, never in ``benchmarks/`` (the benchmarks may import the tests' helpers, not the reverse)."""
    helpers = {p.stem for p in TESTS.rglob("*.py")}  # tests/ comes first on sys.path: its modules are no benchmark's
    benchmarks = {p.stem for p in BENCHMARKS.glob("*.py")} - helpers | {"benchmarks"}
    found = {str(p.relative_to(TESTS)): benchmark_imports(ast.parse(p.read_text(encoding="utf-8")), benchmarks)
             for p in TESTS.rglob("*.py")}
    assert {f: names for f, names in found.items() if names} == {}
    # and in this process (every test module is imported by collection): nothing from benchmarks/ is loaded
    assert not [p for p in sys.path if p and Path(p).resolve() == BENCHMARKS.resolve()]
    assert not [m for m, mod in list(sys.modules.items())
                if BENCHMARKS.resolve() in Path(getattr(mod, "__file__", None) or "/").resolve().parents]
    before = ('sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))\n'
              "from peak_memory import peak_bytes\nimport systems\n"
              'spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")\n')
    assert len(benchmark_imports(ast.parse(before), {"peak_memory", "systems", "benchmarks"})) == 4
