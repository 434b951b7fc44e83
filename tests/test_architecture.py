"""The house rules that keep the code readable: one home for the wire, Flower only in fedpeft/flower,
a public API that covers the docs' examples, a layout section that matches the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fedpeft

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedpeft"
MODULES = sorted(p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "strategies").glob("*.py")])
WIRE = PACKAGE / "flower" / "wire.py"
# string constants that name something on the wire between the server and a node
WIRE_KEYS = {"update.", "metrics.", "refused", "status", "num_examples", "rank", "partition-id", "num-partitions"}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        if isinstance(node, ast.JoinedStr):  # f"update.{cid}"
            for part in node.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.append((node.lineno, part.value))
    return found


def test_wire_keys_are_spelled_only_in_the_wire_module():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for path in MODULES
        if path != WIRE
        for line, value in _string_constants(path)
        if value in WIRE_KEYS or value.startswith(("update.", "metrics."))
    ]
    assert not offenders, "wire keys outside fedpeft/flower/wire.py:\n" + "\n".join(offenders)
    assert {v for _, v in _string_constants(WIRE)} >= WIRE_KEYS  # and the wire module does define them


def test_flower_is_imported_only_in_the_flower_package():
    offenders = []
    audit = PACKAGE / "privacy" / "audit.py"  # drives a real ClientApp, as an auditor would
    for path in MODULES:
        if (PACKAGE / "flower") in path.parents or path == audit:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "flwr" or n.startswith("flwr.")]
    assert not offenders


def test_the_client_app_imports_torch_only_when_a_handler_needs_it():
    # Flower imports the ClientApp in a new process for every message; SecAgg+'s key, share and
    # unmask messages never reach a handler, so importing the app must not cost torch's import
    import subprocess
    import sys

    code = "import sys, fedpeft.flower.client_app; print(sorted(m for m in ('torch', 'transformers', 'opacus') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_strategies_import_nothing_above_state_and_registry():
    allowed = {"fedpeft.state", "fedpeft.registry"}
    for path in (ROOT / "strategies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fedpeft"):
                assert node.module in allowed, f"{path.name} imports {node.module}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_too_long_to_read(path):
    assert len(path.read_text().splitlines()) <= 350


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_public_api_covers_the_docs_examples():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    names = set()
    for doc in docs:
        for block in _python_blocks(doc.read_text()):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedpeft"):
                    assert node.module == "fedpeft", f"{doc.name}: example imports from {node.module}, not fedpeft"
                    names |= {a.name for a in node.names}
    assert names, "the docs have no `from fedpeft import ...` example"
    for name in sorted(names | set(fedpeft.__all__)):
        assert getattr(fedpeft, name) is not None, name


def test_readme_layout_and_architecture_match_the_tree():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    listed = set(re.findall(r"^(\S+)", layout.split("```")[1], flags=re.M))
    for path in PACKAGE.iterdir():
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        entry = f"fedpeft/{path.name}" + ("/" if path.is_dir() else "")
        if path.is_dir() and not (path / "__init__.py").exists():
            continue
        assert entry in listed, f"README's layout does not list {entry}"
    for entry in listed:
        assert (ROOT / entry.rstrip("/")).exists(), f"README's layout lists {entry}, which does not exist"
    arch = (ROOT / "docs" / "architecture.md").read_text()
    for module in re.findall(r"^\| `([\w/]+(?:\.py|/))` \|", arch, flags=re.M):
        assert (PACKAGE / module.rstrip("/")).exists() or (ROOT / module.rstrip("/")).exists(), module
