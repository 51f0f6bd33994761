"""Loading Thrift IDL at run time (thriftpy2)."""
from __future__ import annotations

import contextlib
import hashlib
import keyword
import os
import re
import sys
import threading
import types
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import thriftpy2
import thriftpy2.parser
import thriftpy2.thrift
from thriftpy2.parser.exc import ThriftGrammarError
from thriftpy2.thrift import TType


#: Include directories as thriftpy2's parser takes them.
_Dirs = List[Union[str, "os.PathLike[Any]"]]


def load_idl(path: str, module_name: Optional[str] = None,
             include_dirs: Optional[Sequence[Union[str, "os.PathLike[str]"]]] = None
             ) -> ModuleType:
    """Parse the ``.thrift`` file at ``path`` and return its thriftpy2 module.

    An ``include`` is looked for beside the file that has it, then in
    ``include_dirs`` (``thrift -I``'s directories, in order; by default the
    current directory).

    ``module_name`` must end in ``_thrift`` (thriftpy2's rule); by default it is
    the file's stem plus ``_thrift``, or, when a module of that name came from
    another file (two ``echo.thrift`` in different directories), or one of its
    includes would get the module of another directory's include of that name
    (two services, each with its own ``common.thrift``), that name under a
    package named by a digest of the file's directory
    (``_1a2b3c4d.echo_thrift``), so that its includes get names of their own
    too. Loading the same file twice gives the same module, so classes compare
    equal across calls. A ``module_name`` given that another file's module
    already has, or under which an include would be another file's, is a
    ``ValueError`` (thriftpy2 would hand back that other module). A struct,
    exception or method result thriftpy2 cannot build (a field named like a
    Python keyword its lexer lets through, ``await`` or ``None``; a non-void
    method's exception named ``success``) is a ``ThriftGrammarError`` naming it,
    where thriftpy2 alone drops it and the definitions after it without a word.
    """
    with _refusing_unbuildable_structs():
        return _load(path, module_name, include_dirs)


def _load(path: str, module_name: Optional[str],
          include_dirs: Optional[Sequence[Union[str, "os.PathLike[str]"]]]) -> ModuleType:
    """``load_idl``'s work."""
    real = os.path.realpath(path)    # to compare files
    # absolute, as given (not resolved): includes are found beside a symlink, and
    # the file is the same one after a chdir
    absolute = os.path.abspath(path)
    dirs: Optional[_Dirs] = (None if include_dirs is None
                             else [os.path.abspath(d) for d in include_dirs])
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = module_name or stem + "_thrift"
    holder = _loaded_from(name)
    if holder is not None and holder != real:
        if module_name is not None:
            raise ValueError(f"module name {module_name!r} is taken by the IDL {holder}; "
                             "give this one another name")
        name = _private_name(os.path.dirname(absolute), name)
    elif holder is None:
        parsed = _parse_if_it_includes(absolute, name, dirs)
        stray = None if parsed is None else _stray_include(parsed)
        if stray is not None and module_name is not None:
            raise ValueError(f"{path}: under module name {module_name!r}, its include "
                             f"{stray[0]} would be the module of {stray[1]}, another file "
                             "of that name loaded before; load it without module_name")
        if stray is not None:
            name = _private_name(os.path.dirname(absolute), name)
        elif parsed is not None:
            _hand_to_load(name, parsed)
    return thriftpy2.load(absolute, module_name=name, include_dirs=dirs)


@contextlib.contextmanager
def _refusing_unbuildable_structs() -> Iterator[None]:
    """While thriftpy2 parses, a class whose ``__init__`` it cannot generate is
    an error: it compiles each from the field names, and the ``SyntaxError``
    of a bad one reaches its parser (ply), which takes it for its own signal
    to recover and goes on past the definitions around it, silently. The
    parse lock keeps every other thread's parse out of the window."""
    lock = getattr(thriftpy2.parser.parser, "_parse_lock", None) or _NO_LOCK
    with lock:
        generate = thriftpy2.thrift.init_func_generator
        setattr(thriftpy2.thrift, "init_func_generator", _checked(generate))  # (mypy: by name)
        try:
            yield
        finally:
            thriftpy2.thrift.init_func_generator = generate


#: For a thriftpy2 that keeps no parse lock where ``_refusing_unbuildable_structs`` looks.
_NO_LOCK = threading.RLock()


#: thriftpy2's maker of a struct class's ``__init__``, from its (name, default) pairs.
_InitGenerator = Callable[[type, Optional[List[Tuple[str, Any]]]], Callable[..., None]]


def _checked(generate: _InitGenerator) -> _InitGenerator:
    """thriftpy2's ``init_func_generator`` raising ``ThriftGrammarError``, which
    its parser passes on, for the ``SyntaxError`` it would swallow."""
    def init_func_generator(cls: type,
                            spec: Optional[List[Tuple[str, Any]]]) -> Callable[..., None]:
        try:
            return generate(cls, spec)
        except SyntaxError as exc:
            where = f"{cls.__module__}.{cls.__name__}"
            raise ThriftGrammarError(f"{where}: {_unbuildable(spec or [], exc)}; rename it "
                                     "(field names are not on the wire)") from None
    return init_func_generator


def _unbuildable(spec: List[Tuple[str, Any]], exc: SyntaxError) -> str:
    """Why thriftpy2 could not make an ``__init__`` of the fields ``spec``."""
    names = [name for name, _ in spec]
    for name in names:
        if keyword.iskeyword(name):
            return f"field {name!r} is a Python keyword, which thriftpy2 lets through"
    if names.count("success") > 1:
        return ("a non-void method's exception is named 'success', the name of the "
                "value in its result")
    return f"thriftpy2 cannot make its __init__ ({exc.msg})"


def _private_name(directory: str, name: str) -> str:
    """``name`` under a package named by a digest of the IDL's ``directory``,
    where its includes are found: the module and its includes get names no
    other directory's modules have, and the IDLs of one directory share their
    includes."""
    package = f"_{hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:8]}"
    # an importable (empty) package, so that pickle finds "<package>.<name>"
    sys.modules.setdefault(package, types.ModuleType(package)).__path__ = []
    return f"{package}.{name}"


def _parse_if_it_includes(path: str, name: str,
                          include_dirs: Optional[_Dirs]) -> Optional[ModuleType]:
    """The IDL at ``path`` parsed as ``name`` (its includes looked for in
    ``include_dirs`` too), for ``_stray_include`` to check; None if it includes
    nothing (then there is nothing to check)."""
    with open(path, "rb") as f:
        if not _INCLUDE.search(f.read()):
            return None
    # (not cached yet: if the check finds a stray include, this parse under this
    # name must not be found for the file, which is loaded under another name)
    return thriftpy2.parser.parse(path, module_name=name, enable_cache=False,
                                  include_dirs=include_dirs)


def _stray_include(root: ModuleType) -> Optional[Tuple[str, str]]:
    """An include of the parsed IDL ``root``, at any depth, that thriftpy2 took
    from its cache although it is another file's, as (its module name, that
    other file); None if there is none.

    thriftpy2 names an include by the including module's name prefix and the
    path from the including file's directory (``common.thrift`` beside the IDL:
    ``common_thrift``), and caches modules by name: two services that each ship
    their own ``common.thrift`` would share the first one loaded, types and all.
    """
    todo, seen = [root], set()
    while todo:
        parent = todo.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        parent_name = getattr(parent, "__thrift_module_name__", parent.__name__)
        own = _include_name(os.path.basename(parent.__thrift_file__))
        prefix = parent_name[:-len(own)] if parent_name.endswith(own) else ""
        directory = os.path.dirname(parent.__thrift_file__)
        # (a module that declares nothing has no meta: thriftpy2's own load checks too)
        for child in getattr(parent, "__thrift_meta__", {}).get("includes", ()):
            # the name the include was given, and the one the file it got would have
            meant = child.__thrift_module_name__[len(prefix):]
            if meant != _include_name(os.path.relpath(child.__thrift_file__, directory)):
                return child.__thrift_module_name__, child.__thrift_file__
            todo.append(child)
    return None


def _hand_to_load(name: str, parsed: ModuleType) -> None:
    """Let ``thriftpy2.load`` take ``parsed`` for ``name`` rather than parse the
    file again (a big IDL's load time doubled): it is what load's own parse
    would make, the same file under the same name with the same include
    directories. thriftpy2 caches parses by name in its parser module; should
    a thriftpy2 keep them elsewhere, load just parses again."""
    _parse_cache().setdefault(name, parsed)


def _parse_cache() -> Dict[str, ModuleType]:
    """thriftpy2's cache of parses by module name, which ``thriftpy2.load``
    hands back before it reads a file ({} for a thriftpy2 that keeps none there)."""
    cache = getattr(thriftpy2.parser.parser, "_thrift_cache", None)
    return cache if isinstance(cache, dict) else {}


#: An include statement, wherever on its line (``namespace py x; include "a.thrift"``;
#: a commented-out one too: it costs only the check's parse).
_INCLUDE = re.compile(rb"\binclude\s*[\"']")


def _include_name(relative_path: str) -> str:
    """thriftpy2's module name for an include at ``relative_path`` (prefix left out)."""
    dotted = relative_path.replace(os.sep, ".")
    return dotted[:-len(".thrift")] + "_thrift" if dotted.endswith(".thrift") else dotted


def _loaded_from(module_name: str) -> Optional[str]:
    """The IDL file the module ``module_name`` came from, if there is one: the
    one thriftpy2 has parsed under that name (which its load would hand back,
    whatever the file: the includes of an IDL loaded under a private name, say,
    were parsed under their plain names by the stray-include check), else the
    one loaded."""
    module = _parse_cache().get(module_name) or sys.modules.get(module_name)
    source = getattr(module, "__thrift_file__", None)
    return os.path.realpath(source) if source else None


class Method(NamedTuple):
    """What the RPC layers need to know about one IDL method."""
    name: str
    args_cls: type
    result_cls: type
    oneway: bool
    arg_names: Tuple[str, ...]                 # in declaration order
    exceptions: Tuple[Tuple[str, type], ...]   # declared (result field, class)
    returns_value: bool                        # the result struct has `success`


def check_service(service: Any) -> None:
    """``TypeError`` unless ``service`` is a thriftpy2 service class (``echo_thrift.Echo``):
    the module ``load_idl`` returns, a handler or a name are common slips."""
    if isinstance(service, type) and hasattr(service, "thrift_services"):
        return
    if isinstance(service, ModuleType):
        inside = sorted(name for name, value in vars(service).items()
                        if isinstance(value, type) and hasattr(value, "thrift_services"))
        raise TypeError(f"{service.__name__} is the IDL's module; give one of its services: "
                        + (", ".join(f"{service.__name__}.{name}" for name in inside)
                           or "(it declares none)"))
    raise TypeError(f"expected a thriftpy2 service class (a service of the module load_idl "
                    f"returns, such as echo_thrift.Echo), not {service!r}")


def methods(service: Any) -> Dict[str, Method]:
    """The method table of a thriftpy2 service class, by method name (``TypeError``
    for anything else: see ``check_service``)."""
    check_service(service)
    table = {}
    for name in service.thrift_services:
        args_cls = getattr(service, name + "_args")
        result_cls = getattr(service, name + "_result")
        spec = result_cls.thrift_spec
        # The value is field 0 named success (thriftpy2 adds it for a non-void
        # method); a void method's exception may be named success, or have id 0.
        returns_value = spec.get(0, (None, None))[1] == "success"
        exceptions = tuple((field[1], field[2]) for fid, field in spec.items()
                           if not (fid == 0 and returns_value) and field[0] == TType.STRUCT)
        table[name] = Method(
            name=name, args_cls=args_cls, result_cls=result_cls,
            oneway=bool(getattr(result_cls, "oneway", False)),
            arg_names=tuple(field[1] for field in args_cls.thrift_spec.values()),
            exceptions=exceptions, returns_value=returns_value)
    return table
