"""Apache Thrift classes for ``payload.thrift``, written as ``thrift --gen py`` emits them.

Only what ``thrift.protocol.fastbinary`` needs is kept: each struct's
``__init__`` (every field defaults to ``None``), ``thrift_spec`` and
``__repr__``/``__eq__``/``__ne__`` (written once, in a shared base); the generated pure-Python ``read``/``write`` are left out
because the codec benchmark calls ``fastbinary.encode_binary``/``decode_binary``
directly. The ``thrift_spec`` tuples are those of the Thrift 0.17 compiler
(``thrift --gen py payload.thrift``), including the ``[Class, None]`` struct
references that ``fix_spec`` wires up, so the installed package needs no
Thrift compiler.

For the RPC benchmark, ``Echo.echo`` as the compiler's service module has it:
its argument and result structs (read and written through the accelerated
protocol's C calls, the generated code's fast path), ``EchoClient`` (send the
call, read its reply) and ``EchoProcessor`` (read a call, run the handler,
write the reply), each step what the generated ``Client`` and ``Processor``
do for one method.

Importing this module requires the ``thrift`` (Apache) package.
"""
from thrift.Thrift import TApplicationException, TMessageType, TProcessor, TType
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


class echo_args(_Struct):
    """
    Attributes:
     - message

    """

    def __init__(self, message=None,):
        self.message = message

    def read(self, iprot):
        iprot._fast_decode(self, iprot, [self.__class__, self.thrift_spec])

    def write(self, oprot):
        oprot.trans.write(oprot._fast_encode(self, [self.__class__, self.thrift_spec]))


class echo_result(_Struct):
    """
    Attributes:
     - success

    """

    def __init__(self, success=None,):
        self.success = success

    read = echo_args.read
    write = echo_args.write


all_structs.append(echo_args)
echo_args.thrift_spec = (
    None,  # 0
    (1, TType.STRING, 'message', 'UTF8', None, ),  # 1
)
all_structs.append(echo_result)
echo_result.thrift_spec = (
    (0, TType.STRING, 'success', 'UTF8', None, ),  # 0
)
fix_spec(all_structs)
del all_structs


def require_accelerated(protocol):
    """``protocol`` itself, if it reads and writes through ``fastbinary`` (the
    only path these classes have); a clear error otherwise."""
    if protocol._fast_decode is None or protocol._fast_encode is None:
        raise RuntimeError("Apache Thrift's C extension (thrift.protocol.fastbinary) is not "
                           "installed: the apache-sync benchmark needs the accelerated protocol")
    return protocol


class EchoClient(object):
    """The generated ``Echo.Client``'s ``echo``: one call on a blocking transport."""

    def __init__(self, iprot, oprot=None):
        self._iprot = self._oprot = iprot
        if oprot is not None:
            self._oprot = oprot
        self._seqid = 0

    def echo(self, message):
        oprot = self._oprot
        oprot.writeMessageBegin('echo', TMessageType.CALL, self._seqid)
        echo_args(message).write(oprot)
        oprot.writeMessageEnd()
        oprot.trans.flush()
        iprot = self._iprot
        _, mtype, _ = iprot.readMessageBegin()
        if mtype == TMessageType.EXCEPTION:
            error = TApplicationException()
            error.read(iprot)
            iprot.readMessageEnd()
            raise error
        result = echo_result()
        result.read(iprot)
        iprot.readMessageEnd()
        if result.success is not None:
            return result.success
        raise TApplicationException(TApplicationException.MISSING_RESULT,
                                    "echo failed: unknown result")


class EchoProcessor(TProcessor):
    """The generated ``Echo.Processor`` for ``echo``: a call read, the handler
    run, its reply written (an unknown method gets UNKNOWN_METHOD, a handler's
    error INTERNAL_ERROR, as there)."""

    def __init__(self, handler):
        self._handler = handler
        self._process_map = {"echo": EchoProcessor.process_echo}

    def process(self, iprot, oprot):
        name, _, seqid = iprot.readMessageBegin()
        process = self._process_map.get(name)
        if process is None:
            iprot.skip(TType.STRUCT)
            iprot.readMessageEnd()
            self._reply(oprot, name, TMessageType.EXCEPTION, seqid, TApplicationException(
                TApplicationException.UNKNOWN_METHOD, 'Unknown function %s' % name))
            return
        process(self, seqid, iprot, oprot)
        return True

    def process_echo(self, seqid, iprot, oprot):
        args = echo_args()
        args.read(iprot)
        iprot.readMessageEnd()
        result = echo_result()
        try:
            result.success = self._handler.echo(args.message)
            msg_type = TMessageType.REPLY
        except Exception:
            msg_type = TMessageType.EXCEPTION
            result = TApplicationException(TApplicationException.INTERNAL_ERROR, 'Internal error')
        self._reply(oprot, "echo", msg_type, seqid, result)

    @staticmethod
    def _reply(oprot, name, msg_type, seqid, result):
        oprot.writeMessageBegin(name, msg_type, seqid)
        result.write(oprot)
        oprot.writeMessageEnd()
        oprot.trans.flush()
