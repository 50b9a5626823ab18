"""Two more real English corpora, built at run time from what this machine can reach.

    python scripts/corpora.py django       # Django 5.1.4's documentation (PyPI sdist), 4.5 MB
    python scripts/corpora.py docstrings   # docstrings of this Python's standard library

Each is written once under the data cache (STACKWISE_CACHE_DIR, default
~/.cache/stackwise_jax) and its glob printed, to pass as --config.data.files='GLOB'.
Nothing here is committed: the text belongs to its authors.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import sysconfig
import tarfile
import tempfile

from stackwise_jax import data

DJANGO = "Django==5.1.4"


def _extract_django_docs(archive: str, out: str) -> None:
    """The prose of the docs (docs/**/*.txt, reStructuredText), without release notes
    (hundreds of near-identical short files) and theme licences."""
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if (m.isfile() and len(parts) > 2 and parts[1] == "docs" and m.name.endswith(".txt")
                    and "releases" not in parts and "_theme" not in parts
                    and parts[-1] != "requirements.txt"):
                flat = "_".join(parts[2:])
                with open(os.path.join(out, flat), "wb") as f:
                    f.write(tar.extractfile(m).read())


def django_docs() -> str:
    d = data._from_pypi("django_docs", DJANGO, "Django-5.1.4.tar.gz", _extract_django_docs,
                        "Django's documentation (PyPI sdist Django==5.1.4)", "")
    return os.path.join(d, "*.txt")


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) > 40]


def stdlib_docstrings() -> str:
    """One text file per standard-library module with docstrings (tests excluded)."""
    root = os.path.join(data.cache_root(), "py_docstrings")
    if not os.path.isdir(root):
        lib = sysconfig.get_paths()["stdlib"]
        os.makedirs(data.cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=data.cache_root(), prefix=".py_docstrings-")
        for dirpath, dirnames, filenames in os.walk(lib):
            dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib",
                                                                  "site-packages", "__pycache__"))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    docs = _docstrings(f.read())
                if docs:
                    flat = os.path.relpath(path, lib).replace(os.sep, "_")[:-3] + ".txt"
                    with open(os.path.join(tmp, flat), "w", encoding="utf-8") as f:
                        f.write("\n\n".join(docs) + "\n")
        os.rename(tmp, root)
    return os.path.join(root, "*.txt")


def main() -> None:
    from stackwise_jax.errors import UserError
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=("django", "docstrings"))
    args = parser.parse_args()
    try:
        pattern = django_docs() if args.corpus == "django" else stdlib_docstrings()
    except UserError as e:
        sys.exit(f"error: {e}")
    files = sorted(__import__("glob").glob(pattern))
    size = sum(os.path.getsize(p) for p in files)
    print(f"{len(files)} files, {size / 1e6:.1f} MB", file=sys.stderr)
    print(pattern)


if __name__ == "__main__":
    main()
