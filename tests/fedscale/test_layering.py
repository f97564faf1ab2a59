"""The library imports none of the apps; serving-minded modules stay light."""

import ast
import subprocess
import sys
from pathlib import Path

import fedscale

LIBRARY = Path(fedscale.__file__).parent
APP_PACKAGES = ("server", "edge_client", "simulations", "cli")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _is_app_import(name: str) -> bool:
    # Only fedscale's own modules count: the standard library's http.server is not the app.
    parts = name.split(".")
    ours = name.startswith(".") or parts[0] in ("fedscale", *APP_PACKAGES)
    return ours and any(app in parts for app in APP_PACKAGES)


def test_library_modules_import_no_app_package():
    modules = [p for p in LIBRARY.glob("*.py")]
    assert len(modules) > 8
    offenders = {p.name: sorted(n for n in _imports(p) if _is_app_import(n)) for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_app_packages_are_installed_under_fedscale():
    import fedscale.edge_client.app
    import fedscale.server.app
    import fedscale.simulations.grid

    for module in (
        fedscale.server.app,
        fedscale.edge_client.app,
        fedscale.simulations.grid,
    ):
        assert module.__name__.startswith("fedscale.")


def test_importing_fedscale_imports_neither_torch_nor_flwr():
    code = (
        "import sys, fedscale, fedscale.exceptions; "
        "print('torch' in sys.modules, 'flwr' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
