"""Build the API reference from the docstrings: ``python docs/build_api.py [OUT]`` (default
``build/api``; CI builds it, so a docstring pdoc cannot render fails there)."""

from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path

import pdoc

import pyro_gbnn


def modules() -> list[str]:
    """The package and each of its modules (subpackages' pages list their own modules)."""
    names = [module.name for module in pkgutil.walk_packages(pyro_gbnn.__path__, "pyro_gbnn.")]
    return ["pyro_gbnn", *(name for name in names if not name.endswith("__main__"))]


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "build/api")
    # A subpackage's page already lists its modules; naming them again is harmless.
    warnings.filterwarnings("ignore", message="The module specification")
    # A NamedTuple's generated __init__ does not see its module's names (np, Tensor) under
    # postponed annotations; pdoc shows the annotation as written instead.
    warnings.filterwarnings("ignore", message="Error parsing type annotation")
    pdoc.render.configure(docformat="google", footer_text=f"pyro_gbnn {pyro_gbnn.__version__}")
    pdoc.pdoc(*modules(), output_directory=out)
    print(f"API reference: {out / 'index.html'} ({len(list(out.rglob('*.html')))} pages)")


if __name__ == "__main__":
    main(sys.argv[1:])
