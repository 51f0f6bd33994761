# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""C hot paths: the load balancers' pick and feedback.

Every balancer works on node *indices* ``0..n-1``; ``octo_core.cluster.balancer``
maps them to ``Node`` objects. A pick returns an index, or -1 when no node can be
chosen (no nodes, all weights 0, or all excluded). ``exclude`` is any iterable of
indices to skip (failover passes the nodes already tried); weights are floats in
``[0, 1e6]``, 0 meaning "never pick"; a plain count ``n`` means n nodes of weight 1.

* ``WeightedRandom``: prefix sums and one binary search, O(log n).
* ``RoundRobin``: nginx's smooth weighted round robin, O(log n) amortized.
* ``LeastRequest``: power of two choices on in-flight calls per unit of weight.
* ``LocalityAware``: brpc's LALB (docs/cn/lalb.md) over a sum tree, O(log n).
* ``ConsistentHash``: a ketama ring (libketama's md5 points), O(log ring).

The static balancers keep weights in integer thousandths (``_units``), so sums,
exclusions and round robin ties are exact. Random numbers come from one splitmix64
state per balancer, seeded from ``os.urandom``; ``seed(n)`` makes picks repeatable.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport INFINITY, fabs, floor, llround, sin
from libc.stdint cimport INT64_MAX, int64_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport qsort
from libc.string cimport memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import os

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from *:
    """
    /* Lemire's bounded draw: the high word of x * n is uniform in [0, n), biased by
       at most n / 2^64, and costs a multiply instead of a division. */
    static inline uint64_t octo_lb_below(uint64_t x, uint64_t n) {
        return (uint64_t)(((unsigned __int128)x * n) >> 64);
    }
    """
    uint64_t octo_lb_below(uint64_t x, uint64_t n) nogil


# --- shared helpers ------------------------------------------------------------------

#: Largest weight a node may have; with thousandths this keeps every sum far from 2^63.
MAX_WEIGHT = 1e6
cdef double _UNITS_PER_WEIGHT = 1000.0
cdef int64_t _NEVER = INT64_MAX


cdef inline uint64_t _next(uint64_t* state) noexcept nogil:
    """splitmix64: one add and two multiplies; passes BigCrush."""
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline double _uniform(uint64_t* state) noexcept nogil:
    """A double in [0, 1) from the top 53 bits."""
    return <double>(_next(state) >> 11) * (1.0 / 9007199254740992.0)


cdef list _weights(object weights):
    """``weights`` as a checked list of floats; an int ``n`` means n nodes of weight 1."""
    if isinstance(weights, int):
        if weights < 0:
            raise ValueError(f"node count {weights} is negative")
        return [1.0] * weights
    out = [float(w) for w in weights]
    for w in out:
        if not 0.0 <= w <= MAX_WEIGHT:  # also refuses NaN
            raise ValueError(f"weight {w!r} is not in [0, {MAX_WEIGHT:g}]")
    return out


cdef inline int64_t _units(double weight) noexcept:
    """Integer thousandths; a positive weight never rounds down to "never picked"."""
    if weight == 0.0:
        return 0
    return max(<int64_t>1, <int64_t>llround(weight * _UNITS_PER_WEIGHT))


cdef inline Py_ssize_t _leaves(Py_ssize_t n) noexcept:
    """Leaves of a complete binary tree over ``n`` nodes: the least power of two >= n."""
    cdef Py_ssize_t m = 1
    while m < n:
        m <<= 1
    return m


cdef void* _alloc(Py_ssize_t count, size_t size) except NULL:
    """Zeroed memory for ``count`` items (at least one, so an empty balancer has valid pointers)."""
    cdef size_t nbytes = <size_t>max(count, 1) * size
    cdef void* p = PyMem_Malloc(nbytes)
    if p == NULL:
        raise MemoryError()
    memset(p, 0, nbytes)
    return p


cdef Py_ssize_t* _carry(object previous, Py_ssize_t n, Py_ssize_t n_old) except NULL:
    """``previous`` as a C array (the caller frees it): for each new node, the old index
    whose state it keeps, or -1 for a new node. ``None`` means every node is new."""
    cdef Py_ssize_t* out = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
    cdef unsigned char* taken = NULL
    cdef Py_ssize_t j, p
    try:
        if previous is None:
            for j in range(n):
                out[j] = -1
            return out
        if len(previous) != n:
            raise ValueError(f"previous has {len(previous)} entries for {n} nodes")
        taken = <unsigned char*>_alloc(n_old, 1)
        for j, item in enumerate(previous):
            p = -1 if item is None else item
            if p >= 0:
                if p >= n_old or taken[p]:
                    raise ValueError(f"previous[{j}] = {p} is out of range or reused")
                taken[p] = 1
            out[j] = max(p, -1)
        return out
    except BaseException:
        PyMem_Free(out)
        raise
    finally:
        PyMem_Free(taken)


cdef int _cmp_index(const void* a, const void* b) noexcept nogil:
    cdef Py_ssize_t x = (<const Py_ssize_t*>a)[0], y = (<const Py_ssize_t*>b)[0]
    return (x > y) - (x < y)


cdef class _Picker:
    """Base of every balancer: node count, PRNG and the exclude set of the running pick."""

    def __cinit__(self):
        self._rng = int.from_bytes(os.urandom(8), "little")
        self._resize_exclude(0)

    def __dealloc__(self):
        PyMem_Free(self._excl)
        PyMem_Free(self._marked)

    def __len__(self) -> int:
        return self._n

    def seed(self, seed: int) -> None:
        """Restart the PRNG from ``seed`` (for reproducible tests and benchmarks)."""
        self._rng = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)

    cdef int _resize_exclude(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t* excl = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        cdef unsigned char* marked = <unsigned char*>PyMem_Malloc(max(n, 1))
        if marked == NULL:
            PyMem_Free(excl)
            raise MemoryError()
        memset(marked, 0, max(n, 1))
        PyMem_Free(self._excl)
        PyMem_Free(self._marked)
        self._excl, self._marked, self._n_excl = excl, marked, 0
        return 0

    cdef int _take_exclude(self, object exclude) except -1:
        """Collect ``exclude`` into ``_excl``: in range, deduplicated, ascending."""
        cdef Py_ssize_t i
        try:
            for item in exclude:
                i = item
                if 0 <= i < self._n and not self._marked[i]:
                    self._marked[i] = 1
                    self._excl[self._n_excl] = i
                    self._n_excl += 1
        except BaseException:
            self._drop_exclude()
            raise
        if self._n_excl > 1:
            qsort(self._excl, self._n_excl, sizeof(Py_ssize_t), _cmp_index)
        return 0

    cdef void _drop_exclude(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self._n_excl):
            self._marked[self._excl[k]] = 0
        self._n_excl = 0

    def pick(self, exclude=None) -> int:
        """A node index for the next call (each class says how), or -1 when none
        can be chosen; ``exclude`` is an iterable of indices to skip."""
        return self._pick(exclude)

    cdef Py_ssize_t _pick(self, object exclude) except? -2:
        raise NotImplementedError

    # --- feedback: balancers that learn from calls override _on_start/_on_finish -----

    def on_start(self, Py_ssize_t i) -> None:
        """A call to node ``i`` is starting."""
        self._on_start(self._checked(i))

    def on_finish(self, Py_ssize_t i, double latency_s=0.0, bint ok=True) -> None:
        """A call to node ``i`` ended after ``latency_s`` seconds, successfully or not."""
        self._on_finish(self._checked(i), latency_s, ok)

    cdef Py_ssize_t _checked(self, Py_ssize_t i) except -1:
        """``i``, or ``IndexError`` when it is not a node index (the feedback writes
        the C arrays at ``i``: an index from outside must not reach them unchecked)."""
        if not 0 <= i < self._n:
            raise IndexError(f"node {i} out of range")
        return i

    cdef int _on_start(self, Py_ssize_t i) except -1:
        return 0

    cdef int _on_finish(self, Py_ssize_t i, double latency_s, bint ok) except -1:
        return 0

    # --- objects instead of indices (the face in octo_core.cluster.balancer) ------

    def bind(self, list nodes, dict keys) -> None:
        """What ``select`` hands out: ``nodes[i]`` for index ``i``; ``keys`` maps each
        node's key to its index (for ``exclude`` and the feedback of ``start``/``finish``)."""
        if len(nodes) != self._n or len(keys) != self._n:
            raise ValueError(f"{len(nodes)} nodes and {len(keys)} keys bound to {self._n} indices")
        self._handout, self._keys = nodes, keys

    def select(self, key=None, exclude=None):
        """``pick`` in terms of the bound nodes: one of them, or None. ``exclude``
        holds node keys (str) or objects with a ``key``; ``key`` is for hashing
        balancers only."""
        cdef Py_ssize_t i = self._pick(self._indices(exclude) if exclude else None)
        return None if i < 0 else self._bound(i)

    cdef object _bound(self, Py_ssize_t i):
        """The object bound to node ``i``: ``ValueError`` when the nodes bound are not
        the nodes picked from (none bound, or an ``update`` since ``bind``), as the
        list is read unchecked."""
        cdef list handout = self._handout
        if handout is None or len(handout) != self._n:
            raise ValueError(f"{0 if handout is None else len(handout)} nodes bound to "
                             f"{self._n} indices: bind the nodes after each update")
        return handout[i]

    cdef list _indices(self, object exclude):
        cdef list out = []
        keys = self._keys
        for item in exclude:
            i = keys.get(item if isinstance(item, str) else item.key)
            if i is not None:
                out.append(i)
        return out

    def start(self, node) -> None:
        """``on_start`` for a bound node (one removed since it was selected: ignored)."""
        i = self._keys.get(node.key)
        if i is not None:
            self._on_start(self._checked(i))

    def finish(self, node, double latency_s, bint ok=True) -> None:
        """``on_finish`` for a bound node (one removed since it was selected: ignored)."""
        i = self._keys.get(node.key)
        if i is not None:
            self._on_finish(self._checked(i), latency_s, ok)


# --- weighted random -----------------------------------------------------------------

cdef class WeightedRandom(_Picker):
    """Weighted random pick: prefix sums of the weights, one draw, one binary search.

    ``WeightedRandom(weights)``; ``pick(exclude=None) -> int``; ``update(weights)``.
    """

    def __init__(self, weights=()):
        self.update(weights)

    def __dealloc__(self):
        PyMem_Free(self._w)
        PyMem_Free(self._prefix)

    def update(self, weights) -> None:
        """Replace the node list by ``len(weights)`` nodes with these weights."""
        ws = _weights(weights)
        cdef Py_ssize_t i, n = len(ws)
        cdef int64_t* w = NULL
        cdef int64_t* prefix = NULL
        try:
            w = <int64_t*>_alloc(n, sizeof(int64_t))
            prefix = <int64_t*>_alloc(n, sizeof(int64_t))
            self._resize_exclude(n)
        except BaseException:
            PyMem_Free(w)
            PyMem_Free(prefix)
            raise
        cdef int64_t total = 0
        for i in range(n):
            w[i] = _units(ws[i])
            total += w[i]
            prefix[i] = total
        PyMem_Free(self._w)
        PyMem_Free(self._prefix)
        self._w, self._prefix, self._total, self._n = w, prefix, total, n

    cdef Py_ssize_t _pick(self, object exclude) except? -2:
        """A node index drawn with probability proportional to its weight, or -1."""
        if exclude is None:
            return self._draw()
        self._take_exclude(exclude)
        cdef Py_ssize_t i = self._draw()
        self._drop_exclude()
        return i

    cdef Py_ssize_t _draw(self) noexcept:
        """One weighted draw among the nodes not in ``_excl`` (which must be ascending)."""
        cdef Py_ssize_t k, e, lo, size, half
        cdef int64_t total = self._total
        for k in range(self._n_excl):
            total -= self._w[self._excl[k]]
        if total <= 0:
            return -1
        cdef int64_t r = <int64_t>octo_lb_below(_next(&self._rng), <uint64_t>total)
        # r was drawn on the axis with the excluded intervals cut out; walking them in
        # ascending order, each one that starts at or before r pushes r past itself.
        for k in range(self._n_excl):
            e = self._excl[k]
            if r < self._prefix[e] - self._w[e]:
                break
            r += self._w[e]
        # The first prefix sum above r; a zero weight has an empty interval, never first.
        # The answer is in [lo, lo + size); halving without a branch to mispredict.
        lo, size = 0, self._n
        while size > 1:
            half = size >> 1
            if self._prefix[lo + half - 1] <= r:
                lo += half
            size -= half
        return lo


@cython.final
cdef class LeastRequest(WeightedRandom):
    """Power of two choices: draw two distinct nodes by weight, keep the less loaded.

    Load is in-flight calls per unit of weight (``inflight / weight``, compared by
    cross-multiplying); a tie keeps the first draw. ``on_start(i)`` and
    ``on_finish(i, latency_s, ok)`` bracket every call sent to node ``i``.
    """

    def __dealloc__(self):
        PyMem_Free(self._inflight)

    def update(self, weights, previous=None) -> None:
        """Replace the nodes; ``previous[j]`` (old index or -1) keeps node j's in-flight count."""
        ws = _weights(weights)
        cdef Py_ssize_t j, n = len(ws)
        cdef Py_ssize_t* carry = _carry(previous, n, self._n)
        cdef int64_t* inflight = NULL
        try:
            inflight = <int64_t*>_alloc(n, sizeof(int64_t))
            for j in range(n):
                if carry[j] >= 0:
                    inflight[j] = self._inflight[carry[j]]
            WeightedRandom.update(self, ws)
        except BaseException:
            PyMem_Free(inflight)
            raise
        finally:
            PyMem_Free(carry)
        PyMem_Free(self._inflight)
        self._inflight = inflight

    cdef Py_ssize_t _pick(self, object exclude) except? -2:
        """The less loaded of two weighted draws, or -1."""
        cdef Py_ssize_t a, b, pos
        if exclude is not None:
            self._take_exclude(exclude)
        a = self._draw()
        if a >= 0:
            # Draw the second one with the first excluded too (kept ascending).
            pos = self._n_excl
            while pos > 0 and self._excl[pos - 1] > a:
                pos -= 1
            memmove(&self._excl[pos + 1], &self._excl[pos], (self._n_excl - pos) * sizeof(Py_ssize_t))
            self._excl[pos] = a
            self._n_excl += 1
            b = self._draw()
            self._n_excl -= 1
            memmove(&self._excl[pos], &self._excl[pos + 1], (self._n_excl - pos) * sizeof(Py_ssize_t))
            if b >= 0 and self._inflight[b] * self._w[a] < self._inflight[a] * self._w[b]:
                a = b
        self._drop_exclude()
        return a

    cdef int _on_start(self, Py_ssize_t i) except -1:
        self._inflight[i] += 1
        return 0

    cdef int _on_finish(self, Py_ssize_t i, double latency_s, bint ok) except -1:
        # latency and outcome do not matter here
        if self._inflight[i] > 0:
            self._inflight[i] -= 1
        return 0

    def inflight(self, Py_ssize_t i) -> int:
        """Calls to node ``i`` started and not finished."""
        self._checked(i)
        return self._inflight[i]


# --- smooth weighted round robin -------------------------------------------------------

#: Picks between two rebases of the lines (see ``RoundRobin``): far below overflow
#: (2^16 * 2^30 weight units), rare enough that the O(n) rebase costs nothing.
cdef int64_t _REBASE_EVERY = 1 << 16


@cython.final
cdef class RoundRobin(_Picker):
    """nginx's smooth weighted round robin (weights 5, 1, 1 give A A B A C A A).

    nginx, on each pick, adds every node's weight to its ``current``, takes the node
    with the largest ``current`` (the first one on a tie) and subtracts the total
    weight from it: O(n) per pick. "First" here is index order rotated to begin at
    node ``start`` (modulo the node count): nginx's sequence over the nodes listed
    from ``start`` on. ``start=None`` (the default) draws it at random, so clients
    that start together do not all send their first calls to node 0 and walk the
    nodes in step; ``start=0`` is nginx's own order.

    After ``t`` picks, ``current_i = c_i + t * w_i``, a line in ``t`` whose
    intercept ``c_i`` moves only when ``i`` is picked. So the
    pick is the top line at ``t``, kept here by a kinetic tournament tree: every
    internal node holds the node ahead in its subtree and the first time that can
    change (``_fail``); a pick replays only the comparisons whose time has come, then
    the picked node's path. Same sequence as nginx's loop, ties included.

    ``exclude`` behaves like nginx's skipped (down or already tried) peers: for this
    pick they neither gain their weight nor count in the total. ``update(weights,
    previous)`` keeps ``current`` of the nodes that stay, as nginx keeps it when a
    peer's effective weight changes.
    """

    def __init__(self, weights=(), start=None):
        self._drawn = start is None
        if self._drawn:
            self._draw_start()
        elif start < 0:
            raise ValueError(f"start must be >= 0, not {start}")
        else:
            self._start = start
        self.update(weights)

    def seed(self, seed: int) -> None:
        """Restart the PRNG from ``seed`` and the turns from the beginning (every
        ``current`` 0); a ``start`` that was drawn is drawn again from the PRNG."""
        _Picker.seed(self, seed)
        if self._drawn:
            self._draw_start()
            self._first = self._start % self._n if self._n else 0
        memset(self._c, 0, self._m * sizeof(int64_t))
        self._t = 0
        self._build()

    cdef void _draw_start(self) noexcept:
        self._start = <Py_ssize_t>(_next(&self._rng) >> 2)

    def __dealloc__(self):
        PyMem_Free(self._w)
        PyMem_Free(self._c)
        PyMem_Free(self._on)
        PyMem_Free(self._win)
        PyMem_Free(self._fail)

    def update(self, weights, previous=None) -> None:
        """Replace the nodes; ``previous[j]`` (old index or -1) keeps node j's ``current``."""
        ws = _weights(weights)
        cdef Py_ssize_t i, p, n = len(ws)
        cdef Py_ssize_t m = _leaves(n)
        cdef Py_ssize_t* carry = _carry(previous, n, self._n)
        cdef int64_t* w = NULL
        cdef int64_t* c = NULL
        cdef unsigned char* on = NULL
        cdef Py_ssize_t* win = NULL
        cdef int64_t* fail = NULL
        cdef int64_t total = 0
        try:
            w = <int64_t*>_alloc(m, sizeof(int64_t))
            c = <int64_t*>_alloc(m, sizeof(int64_t))
            on = <unsigned char*>_alloc(m, 1)
            win = <Py_ssize_t*>_alloc(2 * m, sizeof(Py_ssize_t))
            fail = <int64_t*>_alloc(2 * m, sizeof(int64_t))
            self._resize_exclude(n)
            for i in range(n):
                w[i] = _units(ws[i])
                on[i] = w[i] > 0
                total += w[i]
                p = carry[i]
                if p >= 0:
                    c[i] = self._c[p] + self._t * self._w[p]
        except BaseException:
            PyMem_Free(w)
            PyMem_Free(c)
            PyMem_Free(on)
            PyMem_Free(win)
            PyMem_Free(fail)
            raise
        finally:
            PyMem_Free(carry)
        PyMem_Free(self._w)
        PyMem_Free(self._c)
        PyMem_Free(self._on)
        PyMem_Free(self._win)
        PyMem_Free(self._fail)
        self._w, self._c, self._on, self._win, self._fail = w, c, on, win, fail
        self._n, self._m, self._total, self._t = n, m, total, 0
        self._first = self._start % n if n else 0
        self._build()

    cdef Py_ssize_t _pick(self, object exclude) except? -2:
        """The next node of the smooth round robin, or -1."""
        cdef Py_ssize_t k, e, best
        cdef int64_t t, total = self._total
        if total == 0:
            return -1
        if exclude is not None:  # first: a refused exclude set must not cost a step
            self._take_exclude(exclude)
        if self._t >= _REBASE_EVERY:
            # Fold t into the intercepts so t * w never grows large.
            for k in range(self._n):
                self._c[k] += self._t * self._w[k]
            self._t = 0
            self._build()
        t = self._t = self._t + 1
        self._fix(1, t)
        for k in range(self._n_excl):
            e = self._excl[k]
            if self._on[e]:
                self._c[e] -= self._w[e]  # its current stays as it was
                self._on[e] = 0
                total -= self._w[e]
                self._repair(e, t)
        best = self._win[1]
        if self._on[best]:
            self._c[best] -= total
            self._repair(best, t)
        else:
            best = -1
        for k in range(self._n_excl):
            e = self._excl[k]
            if self._w[e] > 0:
                self._on[e] = 1
                self._repair(e, t)
        self._drop_exclude()
        return best

    cdef bint _ahead(self, Py_ssize_t a, Py_ssize_t b, int64_t t) noexcept:
        """Whether ``a`` comes before ``b`` at time ``t``: larger current, then lower index."""
        if not self._on[b]:
            return True
        if not self._on[a]:
            return False
        cdef int64_t va = self._c[a] + t * self._w[a], vb = self._c[b] + t * self._w[b]
        return va > vb or (va == vb and self._earlier(a, b))

    cdef inline bint _earlier(self, Py_ssize_t a, Py_ssize_t b) noexcept:
        """Whether ``a`` wins a tie with ``b``: index order, rotated to begin at ``_first``."""
        if (a >= self._first) == (b >= self._first):
            return a < b
        return a >= self._first

    cdef int64_t _overtake(self, Py_ssize_t x, Py_ssize_t y, int64_t t) noexcept:
        """The first time after ``t`` at which ``y`` comes before ``x`` (``x`` is ahead at ``t``)."""
        if not (self._on[x] and self._on[y]) or self._w[y] <= self._w[x]:
            return _NEVER
        cdef int64_t gap = (self._c[x] + t * self._w[x]) - (self._c[y] + t * self._w[y])
        cdef int64_t rate = self._w[y] - self._w[x]
        # y closes the gap by `rate` per pick; equal currents go to the lower index.
        cdef int64_t steps = gap // rate + 1
        if gap % rate == 0 and self._earlier(y, x):
            steps -= 1
        return t + steps

    cdef void _pull(self, Py_ssize_t v, int64_t t) noexcept:
        """Recompute internal node ``v`` from its children (both valid at ``t``)."""
        cdef Py_ssize_t a = self._win[2 * v], b = self._win[2 * v + 1]
        cdef int64_t flip
        if self._ahead(a, b, t):
            self._win[v] = a
            flip = self._overtake(a, b, t)
        else:
            self._win[v] = b
            flip = self._overtake(b, a, t)
        self._fail[v] = min(flip, self._fail[2 * v], self._fail[2 * v + 1])

    cdef void _fix(self, Py_ssize_t v, int64_t t) noexcept:
        """Bring subtree ``v`` up to time ``t``, visiting only subtrees with a due flip."""
        if self._fail[v] > t:
            return
        self._fix(2 * v, t)
        self._fix(2 * v + 1, t)
        self._pull(v, t)

    cdef void _repair(self, Py_ssize_t i, int64_t t) noexcept:
        """Recompute the ancestors of leaf ``i`` after its line changed."""
        cdef Py_ssize_t v = (self._m + i) >> 1
        while v:
            self._pull(v, t)
            v >>= 1

    cdef void _build(self) noexcept:
        cdef Py_ssize_t v, m = self._m
        for v in range(m):
            self._win[m + v] = v
            self._fail[m + v] = _NEVER
        for v in range(m - 1, 0, -1):
            self._pull(v, self._t)


# --- locality-aware (LALB) -------------------------------------------------------------

#: The longest latency a call is charged (a day, in ns): the window's sums stay in int64.
cdef double _MAX_LATENCY_NS = 86400e9


cdef void _free_nodes(LalbNode* nodes, Py_ssize_t n) noexcept:
    """Free the buffers of ``nodes[0:n]`` (moved-from nodes hold NULL) and the array."""
    cdef Py_ssize_t i
    if nodes == NULL:
        return
    for i in range(n):
        PyMem_Free(nodes[i].ends)
        PyMem_Free(nodes[i].starts)
    PyMem_Free(nodes)


cdef void _forget_start(LalbNode* node, int64_t started) noexcept:
    """Drop the in-flight start time nearest to ``started`` (the call that just ended)."""
    cdef Py_ssize_t lo = 0, hi = node.n_starts, mid
    if hi == 0:
        return  # a finish without a start: nothing in flight to forget
    while lo < hi:
        mid = (lo + hi) >> 1
        if node.starts[mid] < started:
            lo = mid + 1
        else:
            hi = mid
    if lo == node.n_starts or (lo > 0 and started - node.starts[lo - 1] < node.starts[lo] - started):
        lo -= 1
    node.n_starts -= 1
    memmove(&node.starts[lo], &node.starts[lo + 1], (node.n_starts - lo) * sizeof(int64_t))


cdef inline int64_t _latency_ns(double latency_s) noexcept:
    """A call's latency in ns: at least 1 µs, so 1 / latency stays finite; at most a
    day, so the window's sums fit in int64 (negative or NaN: the least)."""
    if not latency_s > 0.0:
        latency_s = 0.0
    return max(<int64_t>llround(min(latency_s * 1e9, _MAX_LATENCY_NS)), <int64_t>1000)


cdef void _base_weight(LalbNode* node, Py_ssize_t window, bint quadratic) noexcept:
    """The node's ``raw`` weight from its ring of ``window`` calls (section
    base_weight): ``qps = (calls - 1) / (last end - first end)`` and ``raw = qps /
    avg_latency ** p``; measured once two calls have ended apart."""
    cdef Py_ssize_t newest, oldest
    cdef int64_t span
    cdef double avg, qps
    if node.count < 2:
        return
    newest = (node.head - 1 + window) % window
    oldest = (node.head - node.count + window) % window
    span = node.ends[newest] - node.ends[oldest]
    if span > 0:
        qps = (node.count - 1) * 1e9 / span
        avg = <double>node.latency_sum / node.count * 1e-9
        node.raw = qps / (avg * avg if quadratic else avg)
        node.measured = True


@cython.final
cdef class LocalityAware(_Picker):
    """Locality-aware load balancing, as brpc's docs/cn/lalb.md describes it.

    A node's weight is its throughput divided by its latency, times its base weight
    (the weight given to ``update``). Traffic follows weight and throughput follows
    traffic, so a node faster than the others gains share until its latency rises
    to theirs: in equilibrium ``base / latency ** p`` is equal across the nodes that
    get traffic (a node with 4 times the base may be twice as slow, for p = 2).

    * base_weight (section base_weight): a ring of the last ``window`` calls (128)
      gives ``qps = (calls - 1) / (last end - first end)`` and ``avg_latency``;
      ``raw = qps / avg_latency ** p`` with p = 2 (``quadratic_latency``, the doc's
      default; p = 1 otherwise). Latency is at least 1 µs.
    * errors: a failed call enters the ring as ``max(latency, avg_latency) *
      punish_error_ratio`` (1.2, brpc's default): a fast failure must not pass for
      a fast success.
    * inflight delay (section inflight delay): if the oldest call still in flight
      has waited ``d > avg_latency * punish_inflight_ratio`` (1.5, brpc's default),
      the weight becomes ``raw * avg_latency / d``. (The doc takes the mean age of
      the calls in flight; the oldest one means fresh calls can not hide a stuck
      one.) A pick that lands on such a node applies it there, so a node that
      stopped answering loses its share without waiting for a timeout; the node
      stays picked if the random point is still inside its smaller weight, which
      picks it with exactly that weight, else the pick draws again.
    * minimum weight: never below ``min_weight_ratio`` (1%) of the mean weight, so
      a slow node still gets the odd call and its recovery is seen.
    * new nodes: until a node has two calls in its window it weighs the mean weight
      per unit of base of the measured nodes — "the average of the others",
      following them as they move.
    * weight tree (section weight tree): a complete binary tree of sums; pick and
      update are O(log n). Each tree node keeps two sums, measured weights and the
      base weights of unmeasured nodes, so the mean applies without touching leaves.

    ``on_start(i)`` / ``on_finish(i, latency_s, ok)`` bracket every call;
    ``update(weights, previous)`` keeps the window and in-flight calls of the nodes
    that stay. ``clock`` (seconds, monotonic) replaces CLOCK_MONOTONIC in tests.
    """

    def __init__(self, weights=(), *, Py_ssize_t window=128, double punish_inflight_ratio=1.5,
                 double punish_error_ratio=1.2, double min_weight_ratio=0.01,
                 bint quadratic_latency=True, clock=None):
        if window < 2:
            raise ValueError("window must hold at least 2 calls")
        if not punish_inflight_ratio > 0.0:
            raise ValueError("punish_inflight_ratio must be positive")
        if not punish_error_ratio >= 1.0:
            raise ValueError("punish_error_ratio must be at least 1")
        if not 0.0 < min_weight_ratio <= 1.0:
            raise ValueError("min_weight_ratio must be in (0, 1]")
        self._window = window
        self._punish_inflight = punish_inflight_ratio
        self._punish_error = punish_error_ratio
        self._min_ratio = min_weight_ratio
        self._quadratic = quadratic_latency
        self._clock = clock
        self.update(weights)

    def __dealloc__(self):
        _free_nodes(self._nodes, self._n)
        PyMem_Free(self._d)
        PyMem_Free(self._u)
        PyMem_Free(self._saved)

    def update(self, weights, previous=None) -> None:
        """Replace the nodes; ``previous[j]`` (old index or -1) keeps node j's window and
        in-flight calls, so its weight carries over (scaled by its new base weight)."""
        ws = _weights(weights)
        cdef Py_ssize_t i, p, n = len(ws)
        cdef Py_ssize_t m = _leaves(n)
        cdef Py_ssize_t* carry = _carry(previous, n, self._n)
        cdef LalbNode* nodes = NULL
        cdef double* d = NULL
        cdef double* u = NULL
        cdef double* saved = NULL
        try:
            nodes = <LalbNode*>_alloc(n, sizeof(LalbNode))
            d = <double*>_alloc(2 * m, sizeof(double))
            u = <double*>_alloc(2 * m, sizeof(double))
            saved = <double*>_alloc(2 * n, sizeof(double))
            self._resize_exclude(n)
        except BaseException:
            PyMem_Free(carry)
            PyMem_Free(nodes)
            PyMem_Free(d)
            PyMem_Free(u)
            PyMem_Free(saved)
            raise
        cdef double base_total = 0.0
        for i in range(n):
            p = carry[i]
            if p >= 0:
                nodes[i] = self._nodes[p]
                # moved: the old array must not free these buffers
                self._nodes[p].ends = self._nodes[p].starts = NULL
            nodes[i].base = ws[i]
            base_total += ws[i]
            if nodes[i].measured:
                d[m + i] = nodes[i].base * nodes[i].level
            else:
                u[m + i] = nodes[i].base
        PyMem_Free(carry)
        for i in range(m - 1, 0, -1):
            d[i] = d[2 * i] + d[2 * i + 1]
            u[i] = u[2 * i] + u[2 * i + 1]
        _free_nodes(self._nodes, self._n)
        PyMem_Free(self._d)
        PyMem_Free(self._u)
        PyMem_Free(self._saved)
        self._nodes, self._d, self._u, self._saved = nodes, d, u, saved
        self._n, self._m, self._base_total = n, m, base_total

    cdef Py_ssize_t _pick(self, object exclude) except? -2:
        """A node index drawn by LALB weight, or -1."""
        cdef Py_ssize_t k, i = -1, v
        cdef int64_t now = -1
        cdef double total, offset
        cdef LalbNode* node
        if self._n == 0:
            return -1
        # The mean is fixed for the whole pick: excluding nodes must not move it.
        cdef double mean = self._mean()
        if exclude is not None:
            self._take_exclude(exclude)
            for k in range(self._n_excl):
                v = self._m + self._excl[k]
                self._saved[2 * k], self._saved[2 * k + 1] = self._d[v], self._u[v]
                self._set_leaf(self._excl[k], 0.0, 0.0)
        try:
            while True:
                total = self._d[1] + self._u[1] * mean
                if not total > 0.0:
                    i = -1
                    break
                i = self._descend(_uniform(&self._rng) * total, mean, &offset)
                node = &self._nodes[i]
                if not (node.measured and node.n_starts):
                    break
                if now < 0:
                    now = self._now()
                # A node late on its in-flight calls gets lighter. Keeping it only if the
                # point still falls in its smaller interval picks it with exactly its new
                # weight; otherwise draw again. With `now` and `mean` fixed for the pick,
                # each node is punished once at most, so the loop ends.
                if not self._punish(i, now, mean) or offset < self._d[self._m + i]:
                    break
        finally:
            for k in range(self._n_excl):
                self._set_leaf(self._excl[k], self._saved[2 * k], self._saved[2 * k + 1])
            self._drop_exclude()
        return i

    cdef int _on_start(self, Py_ssize_t i) except -1:
        # remember when, for the in-flight delay
        cdef int64_t now = self._now()
        cdef LalbNode* node = &self._nodes[i]
        cdef int64_t* starts
        cdef Py_ssize_t pos
        if node.n_starts == node.cap_starts:
            starts = <int64_t*>PyMem_Realloc(node.starts, max(2 * node.cap_starts, 4) * sizeof(int64_t))
            if starts == NULL:
                raise MemoryError()
            node.starts, node.cap_starts = starts, max(2 * node.cap_starts, 4)
        # Kept ascending; with a monotonic clock this is an append.
        pos = node.n_starts
        while pos > 0 and node.starts[pos - 1] > now:
            pos -= 1
        memmove(&node.starts[pos + 1], &node.starts[pos], (node.n_starts - pos) * sizeof(int64_t))
        node.starts[pos] = now
        node.n_starts += 1
        return 0

    cdef int _on_finish(self, Py_ssize_t i, double latency_s, bint ok) except -1:
        # re-weigh the node from its latency and outcome
        cdef int64_t now = self._now()
        cdef LalbNode* node = &self._nodes[i]
        cdef int64_t latency = _latency_ns(latency_s)
        _forget_start(node, now - latency)
        if not ok:
            latency = self._error_latency(node, latency)
        self._window_add(node, now, latency)
        _base_weight(node, self._window, self._quadratic)
        if node.measured:
            node.level = self._level(node, now, self._mean())
            self._set_leaf(i, node.base * node.level, 0.0)
        return 0

    cdef int64_t _error_latency(self, LalbNode* node, int64_t latency) noexcept:
        """What a failed call is charged (section "errors"): ``max(latency,
        avg_latency) * punish_error_ratio``, so a fast failure does not pass for a
        fast success; a day at most, as every latency: with a large ratio the int64
        sums would overflow, the weights go NaN."""
        if node.count:
            latency = max(latency, node.latency_sum // node.count)
        return <int64_t>min(latency * self._punish_error, _MAX_LATENCY_NS)

    cdef int _window_add(self, LalbNode* node, int64_t now, int64_t latency) except -1:
        """Put a call that ended at ``now`` into the node's ring of the last ``window``."""
        cdef Py_ssize_t w = self._window
        if node.ends == NULL:
            node.ends = <int64_t*>_alloc(2 * w, sizeof(int64_t))
            node.latencies = node.ends + w
        if node.count == w:
            node.latency_sum -= node.latencies[node.head]
        else:
            node.count += 1
        node.ends[node.head] = now
        node.latencies[node.head] = latency
        node.latency_sum += latency
        node.head = (node.head + 1) % w
        return 0

    def weight(self, Py_ssize_t i) -> float:
        """Node ``i``'s weight as the next pick sees it (in-flight punishment applied)."""
        self._checked(i)
        cdef double mean = self._mean()
        if self._nodes[i].measured and self._nodes[i].n_starts:
            self._punish(i, self._now(), mean)
        mean = self._mean()
        return self._d[self._m + i] + self._u[self._m + i] * mean

    def inflight(self, Py_ssize_t i) -> int:
        """Calls to node ``i`` started and not finished."""
        self._checked(i)
        return self._nodes[i].n_starts

    cdef int64_t _now(self) except? -1:
        cdef timespec ts
        if self._clock is None:
            clock_gettime(CLOCK_MONOTONIC, &ts)
            return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
        return <int64_t>llround(self._clock() * 1e9)

    cdef double _mean(self) noexcept:
        """Mean measured weight per unit of base: what an unmeasured node weighs per unit."""
        cdef double measured_base = self._base_total - self._u[1]
        if self._d[1] > 0.0 and measured_base > 0.0:
            return self._d[1] / measured_base
        return 1.0

    cdef double _level(self, LalbNode* node, int64_t now, double mean) noexcept:
        """The weight per unit of base of a measured node at ``now``."""
        cdef double level = node.raw
        cdef double avg = <double>node.latency_sum / node.count
        cdef double waited
        if node.n_starts:
            waited = <double>(now - node.starts[0])
            if waited > avg * self._punish_inflight:
                level *= avg / waited
        return max(level, self._min_ratio * mean)

    cdef bint _punish(self, Py_ssize_t i, int64_t now, double mean) noexcept:
        """Apply node ``i``'s in-flight punishment at ``now``; whether its weight dropped."""
        cdef LalbNode* node = &self._nodes[i]
        cdef double level = self._level(node, now, mean)
        if level >= node.level:
            return False
        node.level = level
        self._set_leaf(i, node.base * level, 0.0)
        return True

    cdef void _set_leaf(self, Py_ssize_t i, double d, double u) noexcept:
        # Parents are recomputed as left + right (never adjusted by a difference), so
        # sums do not drift and restoring a leaf restores every sum above it exactly.
        cdef Py_ssize_t v = self._m + i
        self._d[v], self._u[v] = d, u
        v >>= 1
        while v:
            self._d[v] = self._d[2 * v] + self._d[2 * v + 1]
            self._u[v] = self._u[2 * v] + self._u[2 * v + 1]
            v >>= 1

    cdef Py_ssize_t _descend(self, double r, double mean, double* offset) noexcept:
        """The leaf where ``r`` falls, in [0, total weight), and ``r``'s offset in it.
        It never enters an empty subtree, so rounding can not land on a zero-weight or
        excluded node."""
        cdef Py_ssize_t v = 1, left
        cdef double left_weight
        while v < self._m:
            left = 2 * v
            left_weight = self._d[left] + self._u[left] * mean
            if left_weight > 0.0 and (r < left_weight or
                                      self._d[left + 1] + self._u[left + 1] * mean <= 0.0):
                v = left
            else:
                r -= left_weight
                v = left + 1
        offset[0] = r
        return v - self._m


# --- consistent hash (ketama) ----------------------------------------------------------

# MD5 (RFC 1321), enough for ketama: the four state words of the digest are the four
# little-endian uint32s ketama reads from it.
cdef uint32_t _MD5_K[64]
cdef int _MD5_SHIFT[16]
_MD5_SHIFT[:] = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21]
for _i in range(64):
    _MD5_K[_i] = <uint32_t>floor(fabs(sin(_i + 1)) * 4294967296.0)


cdef inline uint32_t _rotl(uint32_t x, int s) noexcept nogil:
    return (x << s) | (x >> (32 - s))


cdef void _md5_block(uint32_t* state, const unsigned char* block) noexcept nogil:
    cdef uint32_t m[16]
    cdef uint32_t a = state[0], b = state[1], c = state[2], d = state[3], f, tmp
    cdef int i, g
    for i in range(16):
        m[i] = (block[4 * i] | (<uint32_t>block[4 * i + 1] << 8)
                | (<uint32_t>block[4 * i + 2] << 16) | (<uint32_t>block[4 * i + 3] << 24))
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
            g = i
        elif i < 32:
            f = (d & b) | (~d & c)
            g = (5 * i + 1) & 15
        elif i < 48:
            f = b ^ c ^ d
            g = (3 * i + 5) & 15
        else:
            f = c ^ (b | ~d)
            g = (7 * i) & 15
        tmp = d
        d = c
        c = b
        b = b + _rotl(a + f + _MD5_K[i] + m[g], _MD5_SHIFT[(i >> 4) * 4 + (i & 3)])
        a = tmp
    state[0] += a
    state[1] += b
    state[2] += c
    state[3] += d


cdef void _md5(const unsigned char* data, Py_ssize_t size, uint32_t* out) noexcept nogil:
    cdef unsigned char tail[128]
    cdef Py_ssize_t full = size & ~63, rest = size - full, padded, k
    cdef uint64_t bits = <uint64_t>size * 8
    out[0], out[1], out[2], out[3] = 0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476
    for k in range(0, full, 64):
        _md5_block(out, data + k)
    # The last bytes, 0x80, zeros, then the bit length (little-endian) end a block.
    padded = 64 if rest < 56 else 128
    memset(tail, 0, padded)
    memcpy(tail, data + full, rest)
    tail[rest] = 0x80
    for k in range(8):
        tail[padded - 8 + k] = (bits >> (8 * k)) & 0xFF
    for k in range(0, padded, 64):
        _md5_block(out, tail + k)


ctypedef struct _RingPoint:
    uint32_t point
    Py_ssize_t rank     # the node key's rank: orders equal points independently of indices
    Py_ssize_t owner


cdef int _cmp_point(const void* a, const void* b) noexcept nogil:
    cdef const _RingPoint* x = <const _RingPoint*>a
    cdef const _RingPoint* y = <const _RingPoint*>b
    if x.point != y.point:
        return -1 if x.point < y.point else 1
    return (x.rank > y.rank) - (x.rank < y.rank)


@cython.final
cdef class ConsistentHash(_Picker):
    """Ketama consistent hashing (libketama's continuum).

    Node ``i`` gets ``floor(w_i / reference * replicas / 4)`` digests (at least one
    when its weight is positive), ``md5(b"<key>-<j>")`` for ``j = 0, 1, ...``; each
    digest gives 4 points, its four little-endian uint32s. A key hashes to the first
    4 bytes of ``md5(key)`` and goes to the first point at or after it, wrapping
    around; excluded nodes are skipped by walking on. Points hashed by two nodes go
    to the node whose key sorts first, independently of the order of the nodes.

    The reference weight is the mean weight (libketama's rule) unless ``update``
    is given one. With equal weights, removing a node moves only its own keys.
    With unequal ones the mean moves too, and the other nodes gain or lose a digest
    or two, which moves a few more keys; so does a node's weight changing (warm-up).
    A fixed reference keeps every other node's points where they are (the cluster
    gives the heaviest configured weight, which moves when that node leaves or is
    reweighted).
    """

    def __init__(self, node_keys=(), weights=None, *, int replicas=160):
        if replicas < 4:
            raise ValueError("replicas must be at least 4 (one digest)")
        self._replicas = replicas
        self.update(node_keys, weights)

    def __dealloc__(self):
        PyMem_Free(self._points)
        PyMem_Free(self._owner)
        PyMem_Free(self._vnodes)

    def update(self, node_keys, weights=None, reference=None) -> None:
        """Rebuild the ring for ``node_keys`` (str or bytes) and their weights (default
        1); a node of weight ``reference`` (default: the mean weight) gets ``replicas``
        points."""
        keys = [k.encode() if isinstance(k, str) else bytes(k) for k in node_keys]
        cdef Py_ssize_t n = len(keys)
        ws = _weights(n if weights is None else weights)
        if len(ws) != n:
            raise ValueError(f"{len(ws)} weights for {n} nodes")
        # digests: floor(w * per_node * scale / total), the mean weight (total / n) or
        # the reference weight (total) getting per_node
        cdef double scale = n, total
        if reference is None:
            total = sum(ws)
        elif 0.0 < reference < INFINITY and reference >= max(ws, default=0.0):   # (NaN fails)
            scale, total = 1.0, reference
        else:   # (below a node's weight, that node's points could outgrow memory)
            raise ValueError(f"reference weight must be finite and at least every node's "
                             f"weight, and above 0, not {reference!r}")
        cdef Py_ssize_t i, j, k, h, size = 0, live = 0, per_node = self._replicas // 4
        cdef Py_ssize_t* vnodes = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        cdef Py_ssize_t* rank = NULL
        cdef _RingPoint* ring = NULL
        cdef uint32_t* points = NULL
        cdef Py_ssize_t* owner = NULL
        cdef uint32_t digest[4]
        cdef char* buf = NULL
        cdef Py_ssize_t key_size, text_size
        cdef double w
        try:
            for i in range(n):
                w = ws[i]
                if w > 0.0:
                    vnodes[i] = max(<Py_ssize_t>1, <Py_ssize_t>floor(w * per_node * scale / total))
                    size += 4 * vnodes[i]
                    live += 1
            rank = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
            for j, i in enumerate(sorted(range(n), key=keys.__getitem__)):
                rank[i] = j
            ring = <_RingPoint*>_alloc(size, sizeof(_RingPoint))
            buf = <char*>_alloc(max([len(key) for key in keys], default=0) + 24, 1)
            k = 0
            for i in range(n):
                key_size = PyBytes_GET_SIZE(keys[i])
                memcpy(buf, PyBytes_AS_STRING(keys[i]), key_size)
                for j in range(vnodes[i]):
                    text_size = key_size + snprintf(buf + key_size, 24, b"-%zd", j)
                    _md5(<const unsigned char*>buf, text_size, digest)
                    for h in range(4):
                        ring[k].point, ring[k].rank, ring[k].owner = digest[h], rank[i], i
                        k += 1
            qsort(ring, size, sizeof(_RingPoint), _cmp_point)
            points = <uint32_t*>_alloc(size, sizeof(uint32_t))
            owner = <Py_ssize_t*>_alloc(size, sizeof(Py_ssize_t))
            for k in range(size):
                points[k], owner[k] = ring[k].point, ring[k].owner
            self._resize_exclude(n)
        except BaseException:
            PyMem_Free(vnodes)
            PyMem_Free(points)
            PyMem_Free(owner)
            raise
        finally:
            PyMem_Free(rank)
            PyMem_Free(ring)
            PyMem_Free(buf)
        PyMem_Free(self._points)
        PyMem_Free(self._owner)
        PyMem_Free(self._vnodes)
        self._points, self._owner, self._vnodes = points, owner, vnodes
        self._n, self._size, self._live = n, size, live

    def pick_key(self, key, exclude=None) -> int:
        """The node owning ``key`` (bytes, or str as UTF-8) on the ring, or -1."""
        cdef const char* data
        cdef Py_ssize_t size
        cdef uint32_t digest[4]
        if isinstance(key, bytes):
            data, size = PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)
        elif isinstance(key, str):
            data = PyUnicode_AsUTF8AndSize(key, &size)
        else:
            raise TypeError(f"hash key must be bytes or str, not {type(key).__name__}")
        _md5(<const unsigned char*>data, size, digest)
        return self._pick_hash(digest[0], exclude)

    cdef Py_ssize_t _pick(self, object exclude) except? -2:
        """The owner of a random point: for calls without a hash key."""
        return self._pick_hash(<uint32_t>(_next(&self._rng) >> 32), exclude)

    def select(self, key=None, exclude=None):
        """The bound node owning ``key`` (bytes or str; anything else as its
        ``str()``), or a random point's owner without a key; None if none."""
        cdef Py_ssize_t i
        excluded = self._indices(exclude) if exclude else None
        if key is None:
            i = self._pick(excluded)
        else:
            i = self.pick_key(key if isinstance(key, (str, bytes)) else str(key), excluded)
        return None if i < 0 else self._bound(i)

    cdef Py_ssize_t _pick_hash(self, uint32_t h, object exclude) except? -2:
        cdef Py_ssize_t i
        if exclude is None:
            return self._walk(h)
        self._take_exclude(exclude)
        i = self._walk(h)
        self._drop_exclude()
        return i

    cdef Py_ssize_t _walk(self, uint32_t h) noexcept:
        """Owner of the first point at or after ``h`` whose node is not excluded."""
        cdef Py_ssize_t k, lo = 0, hi = self._size, live = self._live
        for k in range(self._n_excl):
            if self._vnodes[self._excl[k]]:
                live -= 1
        if live == 0:
            return -1
        while lo < hi:
            k = (lo + hi) >> 1
            if self._points[k] < h:
                lo = k + 1
            else:
                hi = k
        if lo == self._size:
            lo = 0
        while self._marked[self._owner[lo]]:
            lo = lo + 1 if lo + 1 < self._size else 0
        return self._owner[lo]
