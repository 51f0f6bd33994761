"""Apache Thrift classes for ``payload.thrift``, written as ``thrift --gen py`` emits them.

Only what ``thrift.protocol.fastbinary`` needs is kept: each class's
``__init__`` (every field defaults to ``None``), ``thrift_spec`` and
``__repr__``/``__eq__``/``__ne__`` (written once, in a shared base); the generated pure-Python ``read``/``write`` are left out
because the benchmark calls ``fastbinary.encode_binary``/``decode_binary``
directly. The ``thrift_spec`` tuples are those of the Thrift 0.17 compiler
(``thrift --gen py payload.thrift``), including the ``[Class, None]`` struct
references that ``fix_spec`` wires up, so the installed package needs no
Thrift compiler.

Importing this module requires the ``thrift`` (Apache) package.
"""
from thrift.Thrift import TType
from thrift.TRecursive import fix_spec

all_structs: list = []


class _Struct(object):
    """The ``__repr__``/``__eq__``/``__ne__`` the compiler writes into every class."""

    thrift_spec: tuple   # each class's, set after it as the compiler does

    def __repr__(self):
        L = ['%s=%r' % (key, value)
             for key, value in self.__dict__.items()]
        return '%s(%s)' % (self.__class__.__name__, ', '.join(L))

    def __eq__(self, other):
        return isinstance(other, self.__class__) and self.__dict__ == other.__dict__

    def __ne__(self, other):
        return not (self == other)


class Small(_Struct):
    """
    Attributes:
     - id
     - name
     - score

    """

    def __init__(self, id=None, name=None, score=None,):
        self.id = id
        self.name = name
        self.score = score


class Payload(_Struct):
    """
    Attributes:
     - code
     - timestamp
     - ratio
     - active
     - title
     - body
     - ids
     - tags
     - items

    """

    def __init__(self, code=None, timestamp=None, ratio=None, active=None, title=None,
                 body=None, ids=None, tags=None, items=None,):
        self.code = code
        self.timestamp = timestamp
        self.ratio = ratio
        self.active = active
        self.title = title
        self.body = body
        self.ids = ids
        self.tags = tags
        self.items = items


all_structs.append(Small)
Small.thrift_spec = (
    None,  # 0
    (1, TType.I32, 'id', None, None, ),  # 1
    (2, TType.STRING, 'name', 'UTF8', None, ),  # 2
    (3, TType.DOUBLE, 'score', None, None, ),  # 3
)
all_structs.append(Payload)
Payload.thrift_spec = (
    None,  # 0
    (1, TType.I32, 'code', None, None, ),  # 1
    (2, TType.I64, 'timestamp', None, None, ),  # 2
    (3, TType.DOUBLE, 'ratio', None, None, ),  # 3
    (4, TType.BOOL, 'active', None, None, ),  # 4
    (5, TType.STRING, 'title', 'UTF8', None, ),  # 5
    (6, TType.STRING, 'body', 'UTF8', None, ),  # 6
    (7, TType.LIST, 'ids', (TType.I64, None, False), None, ),  # 7
    (8, TType.MAP, 'tags', (TType.STRING, 'UTF8', TType.STRING, 'UTF8', False), None, ),  # 8
    (9, TType.LIST, 'items', (TType.STRUCT, [Small, None], False), None, ),  # 9
)
fix_spec(all_structs)
del all_structs
