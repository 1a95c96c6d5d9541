"""The method registry: one decorator, lookup with suggestions, and plugin loading.

Built-in methods, a user's own file (``--plugin my_method.py``), an importable module
(``--plugin mypkg.methods``) and installed packages (entry-point group ``kdzoo.methods``) all
end up here through the same ``@register_method`` decorator.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
from pathlib import Path

from .errors import UserError, close_matches, missing
from .method import Method

_METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}
_BUILTINS_LOADED = False
_ENTRY_POINTS_LOADED = False


def register_method(name: str, *, aliases: tuple[str, ...] = ()):
    """Class decorator that makes a :class:`Method` available by ``name`` (and aliases)."""

    def decorator(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise UserError(f"@register_method({name!r}) must decorate a subclass of kdzoo.Method")
        if cls.logits_only_teacher and (cls.taps.teacher or not cls.needs_teacher):
            raise UserError(f"method {name!r} declares logits_only_teacher but "
                            + ("taps the teacher's features" if cls.taps.teacher else "has no teacher")
                            + "; declare it only for a method that reads nothing of its teacher but the logits")
        views = cls.loader_views
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise UserError(f"method {name!r} declares loader_views = {views!r}; it must be a whole number of at least 1")
        for key in (name, *aliases):
            owner = _METHODS.get(_ALIASES.get(key, key))
            same = owner is not None and (owner.__module__, owner.__qualname__) == (cls.__module__, cls.__qualname__)
            if owner is not None and not same:
                raise UserError(
                    f"method name {key!r} is already taken by {owner.__module__}.{owner.__qualname__}; "
                    "register yours under another name"
                )
        cls.name = name
        cls.aliases = tuple(aliases)
        cls.source = _source_hash(cls)
        _METHODS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorator


def _source_hash(cls: type) -> str | None:
    """12 hex digits of the file that defines a method outside kdzoo (all of it: the method may
    call helpers beside it); None for kdzoo's own methods and for code with no file (a notebook
    cell), whose result only kdzoo's version can name."""
    if cls.__module__.split(".")[0] == "kdzoo":
        return None
    try:
        path = inspect.getsourcefile(cls)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12] if path else None
    except (OSError, TypeError):
        return None


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    package = importlib.import_module("kdzoo.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"kdzoo.methods.{info.name}")


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group="kdzoo.methods"):
        try:
            ep.load()
        except UserError:
            raise
        except Exception as e:  # a broken third-party package must not look like a kdzoo bug
            raise UserError(
                f"installed plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}; "
                "fix or uninstall that package"
            ) from None


def ensure_loaded() -> None:
    _load_builtins()
    _load_entry_points()


def load_plugin(spec: str) -> None:
    """Import a user's methods from a ``.py`` file path or a dotted module name."""
    _load_builtins()
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.exists():
            if not path.is_file():
                raise UserError(f"{missing('plugin file', spec)}; pass a .py file or an importable module name")
            module_name = f"kdzoo_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
            if module_name in sys.modules:
                return
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                del sys.modules[module_name]
                raise
        else:
            importlib.import_module(spec)
    except UserError:
        raise
    except SyntaxError as e:
        raise UserError(f"plugin {spec!r} has a syntax error at line {e.lineno}: {e.msg}; fix the file") from None
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise UserError(f"plugin {spec!r} is neither a .py file nor an importable module; check the path") from None
        raise UserError(f"plugin {spec!r} failed to import: {e}; install what it needs") from None
    except Exception as e:
        raise UserError(f"plugin {spec!r} failed to load: {type(e).__name__}: {e}; fix the plugin") from None


def method_names() -> list[str]:
    ensure_loaded()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (or an alias); a UserError lists close names."""
    ensure_loaded()
    key = _ALIASES.get(name, name)
    if key in _METHODS:
        return _METHODS[key]
    known = sorted([*_METHODS, *_ALIASES])
    raise UserError(
        f"unknown method {name!r}.{close_matches(name, known)} "
        f"Run `kdzoo list methods` to see all {len(_METHODS)}, or load yours with --plugin FILE.py"
    )


def aliases_of(name: str) -> list[str]:
    return sorted(a for a, target in _ALIASES.items() if target == name)
