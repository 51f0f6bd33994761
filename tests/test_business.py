"""The business pool and the inbox that hands its outcomes back to the event loop."""
import asyncio
import threading
import time
import weakref

import pytest

from octo_core.business import BusinessPool, LoopInbox


class _Job:
    def __init__(self, log, name, gate=None):
        self.log, self.name, self.gate = log, name, gate
        self.started = threading.Event()

    def run(self):
        self.started.set()
        if self.gate is not None:
            self.gate.wait()
        self.log.append(("ran", self.name))

    def cancel(self):
        self.log.append(("cancelled", self.name))


def test_jobs_run_on_pool_threads_and_queued_ones_are_cancelled():
    pool = BusinessPool(1, "test-biz")
    log, gate = [], threading.Event()
    ran = threading.Event()
    try:
        first = _Job(log, "first", gate)
        pool.start(first)
        assert first.started.wait(5)
        pool.start(_Job(log, "second"))
        pool.cancel_pending()            # "second" waits behind "first": never starts
        gate.set()
        pool.start(_Job(log, "third"))   # a pool that cancelled its queue takes work on
        pool.submit(ran.set).result(5)
    finally:
        pool.shutdown(cancel_pending=False)
    assert log == [("cancelled", "second"), ("ran", "first"), ("ran", "third")]
    with pytest.raises(RuntimeError, match="shut down"):
        pool.start(_Job(log, "late"))


def test_a_thread_keeps_no_job_it_has_run():
    # A server's job holds its call's arguments and connection: an idle thread kept
    # its last one alive until its next job, a large request's bytes included.
    pool = BusinessPool(1, "test-biz")
    log = []
    try:
        job = _Job(log, "only")
        gone = weakref.ref(job)
        pool.start(job)
        assert job.started.wait(5)
        del job
        for _ in range(500):   # (the thread drops it once run() returns)
            if gone() is None:
                break
            time.sleep(0.01)
        assert gone() is None
        assert log == [("ran", "only")]
    finally:
        pool.shutdown()


def test_submit_gives_the_outcome_in_a_future():
    pool = BusinessPool(2, "test-biz")
    try:
        assert pool.submit(pow, 2, 10).result(5) == 1024
        with pytest.raises(ZeroDivisionError):
            pool.submit(divmod, 1, 0).result(5)
    finally:
        pool.shutdown()


def test_inbox_takes_items_in_order_with_one_wakeup_per_batch():
    async def main():
        loop = asyncio.get_running_loop()
        taken, wakeups = [], []
        inbox = LoopInbox(loop, lambda *item: taken.append(item))
        real = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            wakeups.append(args[0])
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        threads = [threading.Thread(target=lambda n=n: [inbox.put(n, i) for i in range(100)])
                   for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        while len(taken) < 400:
            await asyncio.sleep(0)
        return taken, wakeups

    taken, wakeups = asyncio.run(main())
    for n in range(4):   # each thread's items in the order it put them
        assert [i for m, i in taken if m == n] == list(range(100))
    assert len(wakeups) == 1   # every put came while the loop was held (the joins): one batch
    assert sorted(taken) == sorted((n, i) for n in range(4) for i in range(100))


def test_an_item_that_fails_is_reported_and_the_batch_goes_on():
    async def main():
        loop = asyncio.get_running_loop()
        reported, taken = [], []
        loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))

        def take(n):
            if n == 1:
                raise ValueError("item 1")
            taken.append(n)

        inbox = LoopInbox(loop, take)
        for n in range(3):
            inbox.put(n)
        await asyncio.sleep(0)
        return reported, taken

    reported, taken = asyncio.run(main())
    assert taken == [0, 2]
    assert [str(exc) for exc in reported] == ["item 1"]


def test_a_closed_loop_refuses_items():
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop, lambda *item: None)
    loop.close()
    for n in range(2):   # each put, not only the first
        with pytest.raises(RuntimeError):
            inbox.put(n)


def test_an_interrupt_in_an_item_leaves_the_rest_for_the_next_run():
    # Ctrl-C (or SystemExit) ends the loop's run as from any callback; the outcomes
    # after it in the batch are still taken once the loop runs again (a server's stop)
    loop = asyncio.new_event_loop()
    taken = []

    def take(n):
        if n == 0:
            raise KeyboardInterrupt
        taken.append(n)

    try:
        inbox = LoopInbox(loop, take)
        for n in range(3):
            inbox.put(n)
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
        inbox.put(3)
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert taken == [1, 2, 3]
