"""The built-in corpus: Python's own documentation, generated on this machine with no download.

Documents, in a fixed order: every topic of the language reference that ships with Python
(pydoc_data.topics: statements, expressions, data model ...), then every public standard library
module and submodule (sorted) rendered as its docstring followed by the signature and docstring of
each public class, method and function it defines. About 2 MB of English prose and code examples,
built in seconds: enough to train a small tokenizer and a debug model end to end.

Only docstrings and signatures are written, never the values of module data (which can hold the
environment, paths or the command line of this machine); default arguments appear only when they
are short literals. The same Python version and platform give the same corpus on any machine
(which modules import depends on both).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

# Modules that do something when imported (open a browser, print, start Tk, touch the terminal) or
# are test suites rather than documentation.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline", "rlcompleter",
        "test", "tests", "idle_test", "__main__"}


def _import(name: str) -> ModuleType | None:
    """The module, or None when it cannot be imported here (other platforms, missing C libraries)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- any failure to import only means the module is left out
        return None


def _modules(names: list[str]) -> Iterator[ModuleType]:
    """The importable public modules among `names` (sorted), each followed by its submodules."""
    for name in sorted(names):
        if name.rsplit(".", 1)[-1] in SKIP or (module := _import(name)) is None:
            continue
        yield module
        if hasattr(module, "__path__"):
            yield from _modules([f"{name}.{m.name}" for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")])


class _Literal:
    """A default argument shown as itself when it is a short literal, else as `...`."""

    def __init__(self, value: object):
        self.value = value

    def __repr__(self) -> str:
        short = isinstance(self.value, (str, bytes)) and len(self.value) <= 20
        return repr(self.value) if short or self.value is None or isinstance(self.value, (int, float, complex)) else "..."


def _signature(obj: object) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = [p if p.default is p.empty else p.replace(default=_Literal(p.default)) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params))


def _docstring(obj: object) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _entry(heading: str, obj: object) -> str:
    """`heading`, then the object's docstring indented below it."""
    doc = _docstring(obj)
    return heading + ("\n" + _indent(doc) if doc else "")


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else line for line in text.splitlines())


def _render_class(name: str, cls: type) -> str:
    bases = ", ".join(base.__name__ for base in cls.__bases__ if base is not object)
    parts = [_entry(f"class {name}" + (f"({bases})" if bases else ""), cls)]
    for attr, member in list(vars(cls).items()):
        if attr.startswith("_") and attr != "__init__":
            continue
        member = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
        if inspect.isroutine(member):
            parts.append(_indent(_entry(f"def {attr}{_signature(member)}", member)))
        elif isinstance(member, property) and _docstring(member):
            parts.append(_indent(_entry(attr, member)))
    return "\n\n".join(parts)


def render_module(module: ModuleType) -> str:
    """The module's docstring, then each public class and function defined in it, in source order."""
    name = module.__name__
    parts = [f"Module {name}" + (f"\n\n{_docstring(module)}" if _docstring(module) else "")]
    public = getattr(module, "__all__", None)
    for attr, obj in list(vars(module).items()):
        if (attr.startswith("_") if public is None else attr not in public) or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            parts.append(_render_class(attr, obj))
        elif inspect.isroutine(obj):
            parts.append(_entry(f"def {attr}{_signature(obj)}", obj))
    return "\n\n".join(parts)


def builtin_documents() -> Iterator[str]:
    """The documents of the built-in corpus, in their fixed order."""
    from pydoc_data.topics import topics

    yield from (topics[name].strip() for name in sorted(topics))
    yield from (render_module(module) for module in _modules([n for n in sys.stdlib_module_names if not n.startswith("_")]))


def write_builtin_corpus(path: str | Path, max_documents: int | None = None) -> Path:
    """Write the built-in corpus (the first `max_documents` documents, or all) as JSON lines {"text": ...}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for count, text in enumerate(builtin_documents()):
            if count == max_documents:
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path
