# cython: language_level=3
"""C layouts of the load balancers in ``_lb.pyx`` (see its docstring for the algorithms)."""
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef class _Picker:
    """What every balancer shares: the node count, the PRNG, and the exclude set of a pick."""
    cdef Py_ssize_t _n
    cdef uint64_t _rng
    # The indices of the current pick's exclude set, deduplicated through _marked.
    cdef Py_ssize_t* _excl
    cdef Py_ssize_t _n_excl
    cdef unsigned char* _marked

    # What select() hands out (see bind): the objects and their keys -> index.
    cdef list _handout
    cdef dict _keys

    cdef int _resize_exclude(self, Py_ssize_t n) except -1
    cdef int _take_exclude(self, object exclude) except -1
    cdef void _drop_exclude(self) noexcept
    cdef Py_ssize_t _pick(self, object exclude) except? -2
    cdef list _indices(self, object exclude)
    cdef object _bound(self, Py_ssize_t i)
    cdef Py_ssize_t _checked(self, Py_ssize_t i) except -1
    cdef int _on_start(self, Py_ssize_t i) except -1
    cdef int _on_finish(self, Py_ssize_t i, double latency_s, bint ok) except -1


cdef class WeightedRandom(_Picker):
    cdef int64_t* _w          # weight units (thousandths)
    cdef int64_t* _prefix     # _prefix[i] = _w[0] + ... + _w[i]
    cdef int64_t _total

    cdef Py_ssize_t _draw(self) noexcept


cdef class LeastRequest(WeightedRandom):
    cdef int64_t* _inflight


cdef class RoundRobin(_Picker):
    cdef int64_t* _w          # weight units of node i; 0 for the padding leaves
    cdef int64_t* _c          # current_i(t) = _c[i] + t * _w[i]
    cdef unsigned char* _on   # takes part in picks: positive weight and not excluded
    cdef Py_ssize_t* _win     # tournament tree: the node ahead in each subtree at time _t
    cdef int64_t* _fail       # the earliest time a comparison inside the subtree can flip
    cdef Py_ssize_t _m        # leaves: a power of two >= _n
    cdef int64_t _t
    cdef int64_t _total
    cdef Py_ssize_t _start    # the tie order begins at node _start % n (see the class)
    cdef Py_ssize_t _first    # ... that is, at this node
    cdef bint _drawn          # _start was drawn from the PRNG (not given)

    cdef bint _earlier(self, Py_ssize_t a, Py_ssize_t b) noexcept
    cdef void _draw_start(self) noexcept

    cdef bint _ahead(self, Py_ssize_t a, Py_ssize_t b, int64_t t) noexcept
    cdef int64_t _overtake(self, Py_ssize_t x, Py_ssize_t y, int64_t t) noexcept
    cdef void _pull(self, Py_ssize_t v, int64_t t) noexcept
    cdef void _fix(self, Py_ssize_t v, int64_t t) noexcept
    cdef void _repair(self, Py_ssize_t i, int64_t t) noexcept
    cdef void _build(self) noexcept


ctypedef struct LalbNode:
    double base               # the weight given to update(): scales everything below
    double raw                # throughput / latency^p from the window (valid when measured)
    double level              # raw after in-flight punishment and the floor: what the tree uses
    bint measured             # the window holds enough to estimate throughput
    # ring of the last `window` calls: end time and charged latency, in ns
    int64_t* ends
    int64_t* latencies
    Py_ssize_t head
    Py_ssize_t count
    int64_t latency_sum
    # start times (ns) of the calls in flight, oldest first
    int64_t* starts
    Py_ssize_t n_starts
    Py_ssize_t cap_starts


cdef class LocalityAware(_Picker):
    cdef LalbNode* _nodes
    # Sum tree over 2*_m slots (leaves at _m + i): _d holds base * level of measured nodes,
    # _u the base of nodes not measured yet, which weigh _mean() per unit of base.
    cdef double* _d
    cdef double* _u
    cdef Py_ssize_t _m
    cdef double _base_total
    cdef double* _saved       # leaf values of excluded nodes, restored after the pick
    cdef Py_ssize_t _window
    cdef double _punish_inflight
    cdef double _punish_error
    cdef double _min_ratio
    cdef bint _quadratic
    cdef object _clock

    cdef int64_t _now(self) except? -1
    cdef void _set_leaf(self, Py_ssize_t i, double d, double u) noexcept
    cdef double _mean(self) noexcept
    cdef double _level(self, LalbNode* node, int64_t now, double mean) noexcept
    cdef bint _punish(self, Py_ssize_t i, int64_t now, double mean) noexcept
    cdef int64_t _error_latency(self, LalbNode* node, int64_t latency) noexcept
    cdef int _window_add(self, LalbNode* node, int64_t now, int64_t latency) except -1
    cdef Py_ssize_t _descend(self, double r, double mean, double* offset) noexcept


cdef class ConsistentHash(_Picker):
    cdef uint32_t* _points    # the ring, ascending
    cdef Py_ssize_t* _owner   # node index of each point
    cdef Py_ssize_t _size
    cdef Py_ssize_t* _vnodes  # digests (4 points each) of node i
    cdef Py_ssize_t _live     # nodes with at least one point
    cdef int _replicas

    cdef Py_ssize_t _pick_hash(self, uint32_t h, object exclude) except? -2
    cdef Py_ssize_t _walk(self, uint32_t h) noexcept
