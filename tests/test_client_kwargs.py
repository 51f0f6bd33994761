"""IDL arguments named like the client's own parameters (``name``, ``timeout``,
``callback``) reach the IDL method untouched, in every call mode.

``AsyncClient.call(name, /, *args, **kwargs)`` takes the keyword ``timeout`` as
its own override only for methods without such an argument; the methods of
``Client``, ``Client.future`` and ``Client.callback`` never take it.
"""
from __future__ import annotations

import io
import queue
import threading

import pytest
import thriftpy2

import octo_core
from octo_core.client import AsyncClient
from octo_core.errors import CallTimeout

from wire_helpers import run, serving, serving_in_thread, watchdog  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

kwargs_thrift = thriftpy2.load_fp(io.StringIO("""
service Search {
  string find(1: string name, 2: i32 timeout),
  string cb(1: string callback),
  string nap(1: string name),
}
"""), module_name="octo_client_kwargs_thrift")
Search = kwargs_thrift.Search

BOB = "name='bob' timeout=5"


class SearchHandler:
    """Says which arguments arrived; ``nap`` answers once ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def find(self, name, timeout):
        return f"name={name!r} timeout={timeout!r}"

    def cb(self, callback):
        return f"callback={callback!r}"

    def nap(self, name):
        self.release.wait(10)
        return name


@pytest.fixture
def client():
    handler = SearchHandler()
    with serving_in_thread([(Search, handler, None)]) as server:
        with octo_core.Client(Search, appkey="c", hosts=[server.address], timeout=5.0) as client:
            yield client
        handler.release.set()   # before the server stops: no call left in flight


def test_async_call_by_name_passes_name_and_timeout_arguments():
    handler = SearchHandler()

    async def main():
        async with serving([(Search, handler, None)]) as server:
            async with octo_core.AsyncClient(Search, appkey="c", hosts=[server.address]) as c:
                assert await c.find(name="bob", timeout=5) == BOB
                assert await c.call("find", name="bob", timeout=5) == BOB
                assert await c.call("find", "bob", timeout=5) == BOB   # an argument, no deadline
                with pytest.raises(CallTimeout):   # no `timeout` argument: the call's own
                    await c.call("nap", "late", timeout=0.05)
                handler.release.set()
    run(main())


def test_blocking_methods_pass_every_argument_to_the_idl_method(client):
    assert client.find(name="bob", timeout=5) == BOB
    assert client.find("bob", timeout=5) == BOB
    assert client.find("bob", 5) == BOB
    assert client.call("find", name="bob", timeout=5) == BOB
    assert client.call("find", "bob", timeout=5) == BOB


def test_future_methods_pass_every_argument_to_the_idl_method(client):
    assert client.future.find(name="bob", timeout=5).result(5) == BOB
    assert client.future.find("bob", timeout=5).result(5) == BOB
    assert client.future.call("find", name="bob", timeout=5).result(5) == BOB


def test_by_name_timeout_overrides_the_deadline_in_every_mode(client):
    with pytest.raises(CallTimeout):
        client.call("nap", "late", timeout=0.05)
    with pytest.raises(CallTimeout):
        client.future.call("nap", "late", timeout=0.05).result(5)
    outcomes: "queue.Queue" = queue.Queue()
    client.callback.call("nap", "late", timeout=0.05, callback=outcomes.put)
    assert isinstance(outcomes.get(timeout=5), CallTimeout)


def test_a_methods_own_timeout_holds_in_every_mode_and_a_calls_own_overrides_it():
    handler = SearchHandler()
    with serving_in_thread([(Search, handler, None)]) as server:
        with octo_core.Client(Search, appkey="c", hosts=[server.address], timeout=5.0,
                              timeouts={"nap": 0.05}) as client:
            assert (client.timeout_of("nap"), client.timeout_of("find")) == (0.05, 5.0)
            with pytest.raises(CallTimeout):
                client.nap("late")
            with pytest.raises(CallTimeout):
                client.future.nap("late").result(5)
            outcomes: "queue.Queue" = queue.Queue()
            client.callback.nap("late", callback=outcomes.put)
            assert isinstance(outcomes.get(timeout=5), CallTimeout)
            with pytest.raises(CallTimeout):
                client.call("nap", "late")
            handler.release.set()
            assert client.call("nap", "in time", timeout=5) == "in time"
            assert client.find("bob", 5) == BOB    # the others keep the client's timeout


@pytest.mark.parametrize("timeouts, error", [
    ({"napp": 1.0}, ValueError), ({"nap": 0}, ValueError), ({"nap": "1"}, ValueError),
    ([("nap", 1.0)], TypeError)])
def test_method_timeouts_are_checked_when_the_client_is_made(timeouts, error):
    with pytest.raises(error, match="nap"):
        AsyncClient(Search, appkey="c", hosts=["127.0.0.1:1"], timeouts=timeouts)


def test_callback_methods_pass_every_argument_to_the_idl_method(client):
    outcomes: "queue.Queue" = queue.Queue()
    client.callback.find(name="bob", timeout=5, callback=outcomes.put)
    assert outcomes.get(timeout=5) == BOB
    client.callback.call("find", "bob", timeout=5, callback=outcomes.put)
    assert outcomes.get(timeout=5) == BOB
    # An IDL argument called `callback` goes by position; the keyword is the callback.
    client.callback.cb("by position", callback=outcomes.put)
    assert outcomes.get(timeout=5) == "callback='by position'"
    assert client.cb(callback="by keyword") == "callback='by keyword'"
    with pytest.raises(TypeError, match="callback must be callable"):
        client.callback.cb(callback="not a function")


def test_a_method_the_service_lacks_gets_pythons_own_suggestion(client):
    """A misspelt method is a plain AttributeError naming the object and the name,
    so Python's traceback suggests the IDL method ("Did you mean: 'find'?"). (No
    __getattr__ of ours says more: on a class it slows every attribute read of its
    instances, every call's path included.)"""
    for owner in (client, client.future, client.callback):
        with pytest.raises(AttributeError) as missing:
            owner.fnd("bob")
        # (what Python's own display reads to suggest: 3.10+ print "Did you mean")
        assert missing.value.name == "fnd" and missing.value.obj is owner
    for cls in (AsyncClient, octo_core.Client):
        assert "__getattr__" not in vars(cls)


@pytest.mark.parametrize("call, says", [
    (lambda c: c.nap("a", "b"), r"^nap\(name\) takes 1 argument, 2 were given$"),
    (lambda c: c.nap(nmae="a"), r"^nap\(name\) has no argument 'nmae'$"),
    (lambda c: c.nap("a", timeout=1),
     r"^nap\(name\) has no argument 'timeout'; a call's own deadline is "
     r"client.call\('nap', \.\.\., timeout=seconds\)$"),
    (lambda c: c.nap("a", name="b"), r"^nap\(name\): .*multiple values for argument 'name'"),
], ids=["too many", "a misspelt keyword", "timeout", "twice"])
def test_arguments_the_method_does_not_take_are_told_in_its_terms(client, call, says):
    """The argument struct's own message named __init__() and counted its self
    ("takes from 1 to 2 positional arguments but 3 were given")."""
    with pytest.raises(TypeError, match=says):
        call(client)

    async def main():   # (refused before any connect: no server needed)
        async with octo_core.AsyncClient(Search, appkey="c", hosts=["127.0.0.1:1"]) as c:
            await call(c)
    with pytest.raises(TypeError, match=says):
        run(main())


def test_a_callback_mode_call_without_its_callback_names_the_method(client):
    with pytest.raises(TypeError, match=r"^Search.find\(\) missing 1 required keyword-only "
                                        r"argument: 'callback'$"):
        client.callback.find("bob")


@pytest.mark.parametrize("make", ["AsyncClient", "Client"])
def test_a_timeout_that_reads_as_milliseconds_is_warned_of_once_at_the_callers_line(make):
    """thriftpy2's timeouts are milliseconds: its timeout=3000 was taken as 50
    minutes without a word. The warning points at the line that made the client
    (a blocking Client makes its AsyncClient on its I/O thread: one warning, not two)."""
    async def make_async(**options):
        await octo_core.AsyncClient(Search, appkey="c", hosts=["127.0.0.1:1"], **options).close()

    def made(**options):
        if make == "Client":
            octo_core.Client(Search, appkey="c", hosts=["127.0.0.1:1"], **options).close()
        else:
            run(make_async(**options))

    with pytest.warns(UserWarning) as caught:
        made(timeout=3000, connect_timeout=999)
    assert [str(w.message) for w in caught] == [
        "timeout=3000 is 50 minutes: octo_core's timeouts are in seconds (thriftpy2's are "
        "in milliseconds; timeout=3 is 3 seconds)"]
    assert {w.filename for w in caught} == {__file__}
    with pytest.warns(UserWarning, match="connect_timeout=5000 is 83 minutes"):
        made(connect_timeout=5000)
    with pytest.warns(UserWarning, match=r"timeouts\['nap'\]=2000 is 33 minutes"):
        made(timeouts={"nap": 2000})
