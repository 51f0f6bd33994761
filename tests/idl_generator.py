"""Random Thrift IDLs, for testing octo_core on IDLs nobody wrote by hand.

``generate(seed, directory)`` writes two files, a main IDL and a second one it
includes, each drawn from ``random.Random(seed)`` (the same seed, the same
text), and says what it wrote: the paths, the module names to load them under,
the packages Apache's ``thrift --gen py`` makes of them, and the service whose
methods the RPC tests call (it extends one of the main file, which extends one
of the included file).

What the files hold: namespaces, enums (values implicit, explicit, negative),
typedefs (of base types, containers, structs, enums, other typedefs), consts
(every kind of value but binary, structs and unions too, and references to
other consts), structs,
unions and exceptions with required, optional and plain fields, field ids
sparse and out of order (and now and then negative), defaults of every kind,
every base type, nested containers, structs that hold themselves (through an
optional field, a list or a map), services that extend others, across the
include too, with void, oneway and throwing methods whose arguments may have
defaults.

The text stays inside what both thriftpy2 and the Apache compiler accept; each
place it keeps away from something one of them refuses or misreads says so
(look for "PEER:").
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

BASE_TYPES = ("bool", "byte", "i8", "i16", "i32", "i64", "double", "string", "binary")
INT_BITS = {"byte": 8, "i8": 8, "i16": 16, "i32": 32, "i64": 64}
# Text in string literals: plain letters, digits, spaces and a few marks.
# PEER: no backslash escapes or quotes: thriftpy2 and the Apache compiler read
# escapes in literals differently (thriftpy2 keeps most of them as written).
LITERAL_CHARS = "abcxyzABCXYZ0123456789 _-.:/"


@dataclass(frozen=True)
class Type:
    """A type as the IDL spells it, and what it stands for.

    ``kind`` is a base type's name, ``enum``, ``struct``, ``list``, ``set`` or
    ``map``; ``args`` the element types of a container; ``ref`` the
    definition an enum or struct type names; ``spell`` the text (a typedef's
    name where the type came through one: what it stands for is the rest).
    """
    kind: str
    spell: str
    args: Tuple["Type", ...] = ()
    ref: Optional["Definition"] = field(default=None, compare=False, hash=False)


@dataclass
class Field:
    fid: int
    name: str
    type: Type
    requiredness: str = ""           # "", "required" or "optional"
    default: Optional[str] = None     # the default's literal


@dataclass
class Definition:
    """An enum (``members``: name -> value) or a struct, union or exception (``fields``)."""
    kind: str                         # "enum", "struct", "union", "exception"
    name: str                         # as spelled from the main file
    members: Dict[str, int] = field(default_factory=dict)
    fields: List[Field] = field(default_factory=list)


class Generated(NamedTuple):
    """What ``generate`` wrote."""
    main_path: str
    included_path: str
    main_module: str                  # the thriftpy2 module name of the main file
    included_module: str
    apache_packages: Tuple[str, str]  # Apache's packages of the main and included files
    service: str                      # the service the RPC tests call (main file)
    text: str                         # both files, for a failure's report


class _Writer:
    """Draws one file's definitions; names are unique across both files."""

    def __init__(self, rng: random.Random, prefix: str) -> None:
        self.rng = rng
        self.prefix = prefix           # every name defined here starts with it
        self.lines: List[str] = []
        self.enums: List[Definition] = []
        self.structs: List[Definition] = []
        self.exceptions: List[Definition] = []
        self.typedefs: List[Type] = []
        self.consts: List[Tuple[str, Type]] = []
        self.counter = 0

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"{self.prefix}{stem}{self.counter}"

    def include(self, other: "_Writer", module: str) -> None:
        """Make what ``other`` defined usable here, as ``module.Name``."""
        renamed = _Requalifier(module + ".", {t.spell for t in other.typedefs})
        self.enums += [renamed.definition(d) for d in other.enums]
        self.structs += [renamed.definition(d) for d in other.structs]
        self.exceptions += [renamed.definition(d) for d in other.exceptions]
        self.typedefs += [renamed.type(t) for t in other.typedefs]
        self.consts += [(module + "." + name, renamed.type(t)) for name, t in other.consts]

    # --- types --------------------------------------------------------------------------

    def type(self, depth: int, itself: Optional[Definition] = None) -> Type:
        """A random type nested at most ``depth`` deep; ``itself`` is the struct being
        written (so fields can hold it, within a container or optional)."""
        roll = self.rng.random()
        if depth <= 0 or roll < 0.4:
            return self.leaf()
        if roll < 0.5 and self.typedefs:
            return self.rng.choice(self.typedefs)
        if roll < 0.6 and itself is not None:
            return Type("struct", itself.name, ref=itself)
        kind = self.rng.choice(("list", "set", "map"))
        if kind == "map":
            key, value = self.key_type(depth - 1, itself), self.type(depth - 1, itself)
            return Type("map", f"map<{key.spell}, {value.spell}>", (key, value))
        element = (self.key_type(depth - 1, itself) if kind == "set"
                   else self.type(depth - 1, itself))
        return Type(kind, f"{kind}<{element.spell}>", (element,))

    def key_type(self, depth: int, itself: Optional[Definition]) -> Type:
        """A set element or map key: mostly a base type or enum, now and then a
        struct or container (thriftpy2 and octo_core take those; Apache's
        Python cannot hold them, and the Apache checks leave such classes out)."""
        if self.rng.random() < 0.85:
            return self.leaf(structs=False)
        return self.type(depth, None)

    def leaf(self, structs: bool = True) -> Type:
        choices: List[Type] = [Type(b, b) for b in BASE_TYPES]
        choices += [Type("enum", e.name, ref=e) for e in self.enums]
        if structs:
            choices += [Type("struct", s.name, ref=s) for s in self.structs + self.exceptions]
        return self.rng.choice(choices)

    # --- literals -----------------------------------------------------------------------

    def literal(self, t: Type, depth: int = 2) -> str:
        """A const value of type ``t`` (a const's name of that type, now and then)."""
        # PEER: no const names where an enum value goes: the Apache compiler takes
        # only the enum's own members there ("Unable to find enum value").
        fitting = [name for name, ct in self.consts if ct == t and t.kind != "enum"]
        if fitting and self.rng.random() < 0.25:
            return self.rng.choice(fitting)
        rng = self.rng
        if t.kind == "bool":
            return rng.choice(("true", "false"))
        if t.kind in INT_BITS:
            bits = INT_BITS[t.kind]
            return str(rng.choice((0, 1, -1, 2 ** (bits - 1) - 1, -(2 ** (bits - 1)),
                                   rng.randint(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))))
        if t.kind == "double":
            # PEER: never an integer literal ("7"): thriftpy2 leaves one inside a
            # list an int (`list<double> = [7]` is [7], Apache [7.0]).
            return rng.choice(("0.0", "1.5", "-2.25", "1e3", "-3.5e-2", "7.0", "-0.0",
                               repr(rng.uniform(-1e6, 1e6))))
        if t.kind in ("string", "binary"):
            text = "".join(rng.choice(LITERAL_CHARS) for _ in range(rng.randint(0, 8)))
            return f'"{text}"'
        if t.kind == "enum":
            assert t.ref is not None
            return f"{t.ref.name}.{rng.choice(list(t.ref.members))}"
        if t.kind in ("list", "set"):
            count = rng.randint(0, 3) if depth > 0 else 0
            return "[" + ", ".join(self.literal(t.args[0], depth - 1) for _ in range(count)) + "]"
        if t.kind == "map":
            count = rng.randint(0, 3) if depth > 0 else 0
            pairs = {}
            for _ in range(count):
                pairs.setdefault(self.literal(t.args[0], depth - 1), self.literal(t.args[1], depth - 1))
            return "{" + ", ".join(f"{k}: {v}" for k, v in pairs.items()) + "}"
        assert t.kind == "struct" and t.ref is not None
        return self.struct_literal(t.ref, depth)

    def struct_literal(self, d: Definition, depth: int) -> str:
        """A struct const: some of its fields (a union's: one), every required one."""
        fields = [f for f in d.fields if not _mentions(f.type, d)
                  and (f.requiredness == "required" or self.rng.random() < 0.5)]
        if d.kind == "union":
            fields = fields[:1]
        parts = [f'"{f.name}": {self.literal(f.type, depth - 1)}' for f in fields]
        return "{" + ", ".join(parts) + "}"

    def can_literal(self, t: Type, depth: int = 2, in_list: bool = False) -> bool:
        """Whether ``literal(t)`` is a value both compilers take as a default or const."""
        if t.kind == "struct":
            assert t.ref is not None
            # PEER: no exception consts (thriftpy2 builds them, Apache refuses
            # exceptions as const types). PEER: no struct literal inside a list:
            # thriftpy2 0.7.1 leaves those as dicts (`const list<P> A = [{"x": 1}]`
            # is `[{'x': 1}]`), a value no codec can write. Structs that hold
            # themselves could recurse, and deep struct literals are left alone.
            # PEER: thriftpy2 refuses a struct const without a required field
            # ("was required to create constant"), and one that holds itself is
            # left out of literals.
            return (t.ref.kind != "exception" and not in_list and depth > 0
                    and bool(t.ref.fields)
                    and not any(f.requiredness == "required" and _mentions(f.type, t.ref)
                                for f in t.ref.fields)
                    and all(self.can_literal(f.type, depth - 1) for f in t.ref.fields
                            if not _mentions(f.type, t.ref)))
        if t.kind == "binary" or (in_list and t.kind == "set"):
            # PEER: thriftpy2 0.7.1 keeps a binary literal as its str ('xy' for
            # `binary b = "xy"`, Apache b'xy'), and a set literal inside a list
            # as a list (`list<set<i32>> = [[1]]` is [[1]], Apache [{1}]): the
            # defaults octo_core copies into what it decodes would hold them.
            return False
        if t.kind in ("set", "map") and t.args[0].kind in ("struct", "list", "set", "map"):
            # PEER: thriftpy2 builds set and map literals as Python sets and
            # dicts: a struct or container element or key is a TypeError there.
            return False
        return all(self.can_literal(a, depth, in_list or t.kind == "list") for a in t.args)

    # --- definitions --------------------------------------------------------------------

    def enum(self) -> None:
        d = Definition("enum", self.name("Enum"))
        members, value, lines = {}, self.rng.randint(-5, 5), []
        for i in range(self.rng.randint(1, 5)):
            name = f"{d.name.upper()}_V{i}"
            if self.rng.random() < 0.5:
                # explicit, negative too; implicit ones follow the last value
                value = self.rng.choice((self.rng.randint(-100, 100), -(2 ** 31), 2 ** 31 - 1 - 8))
                lines.append(f"  {name} = {value},")
            else:
                lines.append(f"  {name},")
            if value in members.values():      # PEER: Apache refuses duplicate values
                lines[-1] = f"  {name} = {max(members.values()) + 1},"
                value = max(members.values()) + 1
            members[name] = value
            value += 1
        d.members = members
        self.lines += [f"enum {d.name} {{"] + lines + ["}", ""]
        self.enums.append(d)

    def typedef(self) -> None:
        target = self.type(2)
        name = self.name("Alias")
        self.lines += [f"typedef {target.spell} {name}", ""]
        self.typedefs.append(Type(target.kind, name, target.args, target.ref))

    def const(self) -> None:
        t = self.type(2)
        if not self.can_literal(t):
            return
        name = self.name("CONST_").upper()
        self.lines += [f"const {t.spell} {name} = {self.literal(t)}", ""]
        self.consts.append((name, t))

    def struct(self, kind: str) -> None:
        d = Definition(kind, self.name(kind.capitalize()))
        ids = self.field_ids(self.rng.randint(0 if kind != "union" else 1, 6))
        for fid in ids:
            d.fields.append(self.field(d, fid))
        body = [self.field_text(f) for f in d.fields]
        self.lines += [f"{kind} {d.name} {{"] + body + ["}", ""]
        (self.exceptions if kind == "exception" else self.structs).append(d)

    def field_ids(self, count: int) -> List[int]:
        """``count`` unique field ids: sparse, sometimes out of order, now and then
        negative (Apache needs --allow-neg-keys for those)."""
        pool = list(range(1, 20)) + [100, 255, 256, 1000, 32767]
        if self.rng.random() < 0.1:
            pool += [-1, -2, -40]
        ids = self.rng.sample(pool, count)
        if self.rng.random() < 0.6:
            ids.sort()
        return ids

    def field(self, owner: Definition, fid: int) -> Field:
        name = f"f{abs(fid)}{'n' if fid < 0 else ''}_{self.rng.choice(('a', 'bb', 'val', 'x_y'))}"
        t = self.type(3, owner)
        holds_itself = t.ref is owner
        requiredness = self.rng.choice(("", "", "optional", "required"))
        if owner.kind == "union" or holds_itself:
            # A union's members are never required (Apache refuses that); a
            # struct holding itself must be able to stop (optional).
            requiredness = "" if owner.kind == "union" else "optional"
        f = Field(fid, name, t, requiredness)
        # PEER: no defaults on union members: thriftpy2 sets each member's
        # default on every new union, so a union with two defaults holds two
        # members (README: octo_core refuses to send one).
        # PEER: no struct literal as a field's default where that struct has a
        # container or struct default itself: Apache's generated Python builds
        # the literal in the class body, where the other class's __init__ reads
        # its thrift_spec, which is set only at the end of ttypes.py (the
        # import fails: "object has no attribute 'thrift_spec'").
        if (owner.kind != "union" and self.rng.random() < 0.35 and not _mentions(t, owner)
                and _default_fits_id(fid, t)
                and not any(_has_mutable_default(d) for d in _structs_in(t))
                and self.can_literal(t)):
            f.default = self.literal(t)
        return f

    @staticmethod
    def field_text(f: Field) -> str:
        req = f"{f.requiredness} " if f.requiredness else ""
        default = f" = {f.default}" if f.default is not None else ""
        return f"  {f.fid}: {req}{f.type.spell} {f.name}{default},"

    def service(self, extends: Optional[str]) -> str:
        name = self.name("Service")
        head = f"service {name}" + (f" extends {extends}" if extends else "")
        methods = [self.method() for _ in range(self.rng.randint(1, 4))]
        self.lines += [head + " {"] + methods + ["}", ""]
        return name

    def method(self) -> str:
        name = self.name("m").lower()
        roll = self.rng.random()
        oneway = roll < 0.15
        void = oneway or roll < 0.35
        returns = "void" if void else self.type(3).spell
        args = []
        for fid in self.field_ids(self.rng.randint(0, 4)):
            t = self.type(3)
            default = ""
            if self.rng.random() < 0.25 and _default_fits_id(fid, t) and self.can_literal(t):
                default = f" = {self.literal(t)}"
            args.append(f"{fid}: {t.spell} a{abs(fid)}{'n' if fid < 0 else ''}{default}")
        throws = ""
        if not oneway and self.exceptions and self.rng.random() < 0.6:
            chosen = self.rng.sample(self.exceptions, self.rng.randint(1, min(2, len(self.exceptions))))
            ids = self.field_ids(len(chosen))
            throws = " throws (" + ", ".join(
                f"{fid}: {e.name} e{abs(fid)}{'n' if fid < 0 else ''}" for fid, e in zip(ids, chosen)) + ")"
        return f"  {'oneway ' if oneway else ''}{returns} {name}({', '.join(args)}){throws},"

    def definitions(self, count: int) -> None:
        """Enums first (every other kind may use them), then the rest mixed."""
        for _ in range(self.rng.randint(1, 2)):
            self.enum()
        makers = [self.typedef, self.const, lambda: self.struct("struct"),
                  lambda: self.struct("struct"), lambda: self.struct("union"),
                  lambda: self.struct("exception")]
        for _ in range(count):
            self.rng.choice(makers)()
        if not self.exceptions:
            self.struct("exception")


class _Requalifier:
    """The types and definitions of an included file as the including one names them."""

    def __init__(self, qualifier: str, aliases: set) -> None:
        self.qualifier = qualifier
        self.aliases = aliases          # the included file's typedef names
        self.done: Dict[int, Definition] = {}

    def definition(self, d: Definition) -> Definition:
        if id(d) not in self.done:
            new = Definition(d.kind, self.qualifier + d.name, dict(d.members))
            self.done[id(d)] = new      # before the fields: a struct may hold itself
            new.fields = [Field(f.fid, f.name, self.type(f.type), f.requiredness, f.default)
                          for f in d.fields]
        return self.done[id(d)]

    def type(self, t: Type) -> Type:
        args = tuple(self.type(a) for a in t.args)
        ref = None if t.ref is None else self.definition(t.ref)
        if t.spell in self.aliases:
            spell = self.qualifier + t.spell
        elif t.kind in ("enum", "struct"):
            spell = ref.name if ref is not None else t.spell
        elif args:
            spell = f"{t.kind}<{', '.join(a.spell for a in args)}>"
        else:
            spell = t.spell
        return Type(t.kind, spell, args, ref)


def _structs_in(t: Type) -> List[Definition]:
    """The structs type ``t`` holds, and those their fields hold (each once)."""
    found: List[Definition] = []

    def walk(t: Type) -> None:
        if t.ref is not None and t.kind == "struct" and all(d is not t.ref for d in found):
            found.append(t.ref)
            for f in t.ref.fields:
                walk(f.type)
        for a in t.args:
            walk(a)
    walk(t)
    return found


def _default_fits_id(fid: int, t: Type) -> bool:
    """PEER: no container or struct default on a negative field id: Apache's
    generated __init__ copies such a default out of its thrift_spec, which it
    leaves empty where ids are negative (an IndexError at every construction)."""
    return fid > 0 or t.kind not in ("list", "set", "map", "struct")


def _has_mutable_default(d: Definition) -> bool:
    return any(f.default is not None and f.type.kind in ("list", "set", "map", "struct")
               for f in d.fields)


def _mentions(t: Type, d: Definition) -> bool:
    """Whether type ``t`` holds the struct ``d`` (a default of it would be recursive)."""
    return t.ref is d or any(_mentions(a, d) for a in t.args)


def generate(seed: int, directory: str) -> Generated:
    """Write the IDLs of ``seed`` into ``directory`` (see the module's docstring)."""
    rng = random.Random(seed)
    stem = f"gen{seed}"
    inc_name, main_name = f"{stem}_common", f"{stem}_main"
    included = _Writer(rng, "C")
    included.definitions(rng.randint(2, 6))
    base = included.service(None)
    main = _Writer(rng, "M")
    main.include(included, inc_name)
    main.definitions(rng.randint(3, 9))
    middle = main.service(f"{inc_name}.{base}")
    top = main.service(middle)
    packages = (f"{stem}_main_apache", f"{stem}_common_apache")
    inc_text = "\n".join([f"namespace py {packages[1]}", "namespace java gen.common", ""] + included.lines)
    main_text = "\n".join([f'include "{inc_name}.thrift"', "",
                           f"namespace py {packages[0]}", "namespace java gen.main", ""] + main.lines)
    paths = (os.path.join(directory, f"{main_name}.thrift"), os.path.join(directory, f"{inc_name}.thrift"))
    for path, text in zip(paths, (main_text, inc_text)):
        with open(path, "w") as out:
            out.write(text)
    return Generated(paths[0], paths[1], f"{main_name}_thrift", f"{inc_name}_thrift", packages, top,
                     f"// {inc_name}.thrift\n{inc_text}\n// {main_name}.thrift\n{main_text}")


if __name__ == "__main__":   # python tests/idl_generator.py SEED DIR: a failing seed's IDLs
    import sys
    print(generate(int(sys.argv[1]), sys.argv[2]).text)
