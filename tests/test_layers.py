"""The package's layers: import-linter's contracts hold, and every module sits in a layer."""

import os
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _contracts() -> list[dict]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def test_import_contracts_are_kept():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    out = subprocess.run(
        [lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in out.stdout


def test_every_module_of_the_package_is_in_a_layer():
    """A new top-level module or folder must be placed in the layers, not escape them."""
    (layers,) = [c["layers"] for c in _contracts() if c["type"] == "layers"]
    named = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    pkg = os.path.join(REPO, "simclr_jax")
    found = {
        f"simclr_jax.{name.removesuffix('.py')}"
        for name in os.listdir(pkg)
        if (name.endswith(".py") and name != "__init__.py")
        or os.path.exists(os.path.join(pkg, name, "__init__.py"))
    }
    assert found == named, f"not in a layer: {found - named}; no such module: {named - found}"


def test_methods_independence_lists_every_registered_method():
    from simclr_jax import methods

    (mods,) = [c["modules"] for c in _contracts() if c["type"] == "independence"]
    files = {m.split(".")[-1] for m in mods}
    assert set(methods.names()) <= files
