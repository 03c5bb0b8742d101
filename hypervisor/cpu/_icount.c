/*
 * Instructions retired, counted exactly and cheaply: per translated block, not per instruction.
 *
 * A per-instruction code hook (Unicorn's own `count=` stop is one) makes Unicorn sync
 * RIP and materialise EFLAGS before every instruction and call out; it was 35-45% of
 * a run's wall time.  This is a UC_HOOK_BLOCK callback instead: it runs once when a
 * translated block starts and adds the block's instruction count to `counter`.  The
 * count comes from a direct-mapped cache keyed by (block address, block size); on a
 * miss the vCPU's `miss` callback (Python: cpu/blocks.py decodes the block's bytes,
 * once per content) supplies it.  Python drops the whole cache by bumping
 * `generation` whenever the code behind an address may have changed (a fetch TLB
 * fill: a new address space or a remapped page; a host write to a code frame).
 *
 * The hook runs once per block executed (130 million times in `hvsim run kernels --vms
 * 16 --ksm`), so its common case is kept to two compares of cached words against the
 * block and one against the limit, then one pointer store and one add: an entry's
 * size and generation share one word (`tag`: size | generation << 32), and the block
 * that started is kept as a pointer to its entry, from which Python reads its
 * address, size and count (block_pc, block_size, block_count).  The entry stays as it
 * is until another block starts, since only a block's start writes the cache.
 *
 * Slices end at block boundaries: when a block is about to start and `counter` has
 * reached `limit`, the hook asks Unicorn to stop (Unicorn's check for a stop request
 * follows the block hook, before the block's first instruction), leaving RIP at the
 * block and setting `stopped` and `stop_pc` (the block's address: RIP, known without
 * a register read).  So a slice ends at the first block boundary at or
 * after its limit, which does not depend on where earlier slices ended.  Inside a
 * block, `counter` already includes the whole block; the exact count at an
 * instruction is `counter - block_count + (instructions of the block before RIP)`,
 * which cpu/clock.py computes when something needs the time mid-block (an exit, a
 * TSC read, the end of a slice inside a block).
 *
 * Consecutive host turns in one run: with `period` set, reaching `limit` at a block
 * boundary below `hard` is the end of a host turn (scheduler.py) with nothing else to
 * do there; the next turn starts at that boundary (`turn_start`, `turns` counts them)
 * and the limit moves to min(counter + period, hard), exactly where the scheduler
 * would have ended the next turn.  At `hard` (or with `period` 0) the run stops.
 *
 * `stop` is Unicorn's uc_emu_stop and `miss` a ctypes callback, both passed in by
 * address so that this module does not link against libunicorn.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define CACHE_BITS 12
#define CACHE_SIZE (1u << CACHE_BITS)

/* size < 2**32 (Unicorn passes it as uint32_t), generation < 2**32 (set_generation wraps it). */
#define TAG_SHIFT 32
#define TAG_SIZE_MASK ((UINT64_C(1) << TAG_SHIFT) - 1)

struct block_entry {
    uint64_t pc;
    uint64_t tag; /* size | generation << TAG_SHIFT */
    uint64_t count;
    uint64_t unused; /* a power-of-two stride */
};

struct icount {
    uint64_t counter;
    uint64_t limit;
    int (*stop)(void *uc);
    uint64_t stopped;
    /* The block that started last (its cache entry), or NULL: none since the run started or it was left. */
    struct block_entry *block;
    uint64_t gen_tag; /* generation << TAG_SHIFT */
    uint64_t (*miss)(uint64_t pc, uint64_t size);
    uint64_t misses;
    uint64_t failed;
    uint64_t period;
    uint64_t hard;
    uint64_t turn_start;
    uint64_t turns;
    /* Where the hook stopped the run: the block it kept from starting (RIP is there). */
    uint64_t stop_pc;
    struct block_entry cache[CACHE_SIZE];
};

static inline struct block_entry *entry_of(struct icount *ic, uint64_t address)
{
    return &ic->cache[(address ^ (address >> CACHE_BITS)) & (CACHE_SIZE - 1)];
}

static inline void start_block(struct icount *ic, struct block_entry *e)
{
    ic->block = e;
    ic->counter += e->count;
}

static void stop_before(struct icount *ic, void *uc, uint64_t address)
{
    ic->stopped = 1;
    ic->stop_pc = address;
    ic->stop(uc);
}

/* Everything but the common case: the end of a slice or of a host turn, a block not in the cache. */
static __attribute__((noinline)) void block_hook_slow(void *uc, uint64_t address, uint32_t size, struct icount *ic)
{
    struct block_entry *e;
    uint64_t n;

    if (ic->counter >= ic->limit) {
        if (ic->period == 0 || ic->counter >= ic->hard) {
            stop_before(ic, uc, address);
            return;
        }
        ic->turn_start = ic->counter;
        ic->turns++;
        ic->limit = ic->hard - ic->counter > ic->period ? ic->counter + ic->period : ic->hard;
    }
    e = entry_of(ic, address);
    if (e->pc != address || e->tag != (ic->gen_tag | size)) {
        n = ic->miss(address, size);
        ic->misses++;
        if (n == 0) {
            /* The decoder failed (it kept the exception): stop before the block runs. */
            ic->failed = 1;
            stop_before(ic, uc, address);
            return;
        }
        e->pc = address;
        e->tag = ic->gen_tag | size;
        e->count = n;
    }
    start_block(ic, e);
}

/* Called by Unicorn as every translated block starts.  The common case (below the limit, the count
 * cached) is kept to a few loads and stores with nothing to save (a leaf); the rest is block_hook_slow. */
static void block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct icount *ic = (struct icount *)user_data;
    struct block_entry *e = entry_of(ic, address);

    if (__builtin_expect(e->pc == address && e->tag == (ic->gen_tag | size) && ic->counter < ic->limit, 1)) {
        start_block(ic, e);
        return;
    }
    block_hook_slow(uc, address, size, ic);
}

/*
 * struct icount as a Python object (ICount): Python reads and writes its fields as attributes, each a member
 * descriptor (about a third of what a ctypes.Structure field costs: cpu/clock.py sets ten of them before
 * every run), and the block hook gets the address of the struct inside it (`address`) as its user_data.
 * The block-count cache starts zeroed (generation 0, which Python never uses: no entry is a hit).
 */
typedef struct {
    PyObject_HEAD
    struct icount ic;
} ICountObject;

#define IC_FIELD(name, doc) \
    {#name, T_ULONGLONG, offsetof(ICountObject, ic) + offsetof(struct icount, name), 0, doc}

static PyMemberDef icount_members[] = {
    IC_FIELD(counter, "Instructions (and retried faults' cost) counted in this run."),
    IC_FIELD(limit, "The run (or host turn) ends at the first block boundary at or after this count."),
    IC_FIELD(stopped, "1 once the hook stopped the run before a block."),
    IC_FIELD(misses, "Blocks whose count came from the miss callback."),
    IC_FIELD(failed, "1 if the miss callback failed (it kept the exception)."),
    IC_FIELD(period, "With consecutive host turns in one run: the turn's length (0: none)."),
    IC_FIELD(hard, "... and where the run stops."),
    IC_FIELD(turn_start, "Where the last host turn that ended in this run ended."),
    IC_FIELD(turns, "Host turns that ended in this run."),
    IC_FIELD(stop_pc, "Where the hook stopped the run: the block it kept from starting."),
    {NULL, 0, 0, 0, NULL},
};

static PyObject *icount_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"stop", "miss", NULL};
    unsigned long long stop, miss;
    ICountObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KK", kwlist, &stop, &miss))
        return NULL;
    self = (ICountObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->ic.stop = (int (*)(void *))(uintptr_t)stop;
    self->ic.miss = (uint64_t(*)(uint64_t, uint64_t))(uintptr_t)miss;
    return (PyObject *)self;
}

/* start_run(limit, period, hard): the struct as a run starts (cpu/clock.py VcpuClock.start_slice): the counter
 * from 0, the limit, the host turns' period and hard end, no turn ended, not stopped, no block started.  One
 * call for the eight fields (each attribute write is a type lookup and a descriptor call from Python). */
static PyObject *icount_start_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct icount *ic = &((ICountObject *)self)->ic;
    uint64_t limit, period, hard;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "start_run(limit, period, hard)");
        return NULL;
    }
    limit = PyLong_AsUnsignedLongLong(args[0]);
    period = PyLong_AsUnsignedLongLong(args[1]);
    hard = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    ic->counter = 0;
    ic->limit = limit;
    ic->period = period;
    ic->hard = hard;
    ic->turn_start = ic->turns = 0;
    ic->stopped = 0;
    ic->block = NULL;
    Py_RETURN_NONE;
}

/* leave_block(): no block is running (RIP left it): block_pc, block_size and block_count read 0. */
static PyObject *icount_leave_block(PyObject *self, PyObject *unused)
{
    (void)unused;
    ((ICountObject *)self)->ic.block = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef icount_methods[] = {
    {"start_run", (PyCFunction)(void (*)(void))icount_start_run, METH_FASTCALL,
     "start_run(limit, period, hard): counter 0, these limits, no turn ended, not stopped, no block started."},
    {"leave_block", icount_leave_block, METH_NOARGS, "leave_block(): no block is running (RIP left it)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *icount_address(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(&((ICountObject *)self)->ic);
}

static PyObject *icount_block_pc(PyObject *self, void *closure)
{
    struct block_entry *e = ((ICountObject *)self)->ic.block;
    (void)closure;
    return PyLong_FromUnsignedLongLong(e == NULL ? 0 : e->pc);
}

static PyObject *icount_block_size(PyObject *self, void *closure)
{
    struct block_entry *e = ((ICountObject *)self)->ic.block;
    (void)closure;
    return PyLong_FromUnsignedLongLong(e == NULL ? 0 : e->tag & TAG_SIZE_MASK);
}

static PyObject *icount_block_count(PyObject *self, void *closure)
{
    struct block_entry *e = ((ICountObject *)self)->ic.block;
    (void)closure;
    return PyLong_FromUnsignedLongLong(e == NULL ? 0 : e->count);
}

static PyObject *icount_get_generation(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((ICountObject *)self)->ic.gen_tag >> TAG_SHIFT);
}

/* A generation of 2**32 or more (four billion cache drops) empties the cache and starts again at 1, so
 * that it fits the entries' tag: no entry of an old generation can match after the wrap.  The running
 * block's entry is kept (Python may read it until the block ends), retagged with generation 0, which
 * no run uses: it cannot match either. */
static int icount_set_generation(PyObject *self, PyObject *value, void *closure)
{
    struct icount *ic = &((ICountObject *)self)->ic;
    unsigned long long generation;

    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "generation cannot be deleted");
        return -1;
    }
    generation = PyLong_AsUnsignedLongLong(value);
    if (generation == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (generation >> TAG_SHIFT) {
        struct block_entry running = ic->block != NULL ? *ic->block : (struct block_entry){0, 0, 0, 0};

        memset(ic->cache, 0, sizeof(ic->cache));
        if (ic->block != NULL) {
            running.tag &= TAG_SIZE_MASK;
            *ic->block = running;
        }
        generation = 1;
    }
    ic->gen_tag = (uint64_t)generation << TAG_SHIFT;
    return 0;
}

static PyGetSetDef icount_getset[] = {
    {"address", icount_address, NULL, "Address of the struct icount, the block hook's user_data.", NULL},
    {"block_pc", icount_block_pc, NULL, "The block that started last: its address (0: none running).", NULL},
    {"block_size", icount_block_size, NULL, "... its size in bytes.", NULL},
    {"block_count", icount_block_count, NULL, "... its instruction count.", NULL},
    {"generation", icount_get_generation, icount_set_generation,
     "The cache's entries of another generation are misses (from 2**32 it empties the cache and reads 1).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ICountType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hypervisor.cpu._icount.ICount",
    .tp_doc = "ICount(stop, miss): one vCPU's struct icount (stop: uc_emu_stop's address, miss: the miss callback's).",
    .tp_basicsize = sizeof(ICountObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = icount_new,
    .tp_methods = icount_methods,
    .tp_members = icount_members,
    .tp_getset = icount_getset,
};

/*
 * Two libunicorn calls made from here rather than through ctypes (whose argument conversions and libffi
 * call cost about 0.6 us each; a vCPU runs once per host turn, tens of thousands of times in a run):
 * uc_emu_start() and uc_ctl(), given their addresses and the engine handle.  The GIL stays held while
 * Unicorn runs: the hooks it calls are Python callbacks, which then find the GIL theirs instead of
 * taking it back at every call (hvsim runs no other Python thread meanwhile).
 */
typedef int (*uc_emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*uc_ctl_fn)(void *uc, int control, ...);

static PyObject *emu_start(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *fn, *uc;
    uint64_t begin, until;

    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "emu_start(uc_emu_start, uc, begin, until)");
        return NULL;
    }
    fn = PyLong_AsVoidPtr(args[0]);
    uc = PyLong_AsVoidPtr(args[1]);
    begin = PyLong_AsUnsignedLongLong(args[2]);
    until = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(((uc_emu_start_fn)fn)(uc, begin, until, 0, 0));
}

static PyObject *ctl(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *fn, *uc;
    long control;

    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "ctl(uc_ctl, uc, control)");
        return NULL;
    }
    fn = PyLong_AsVoidPtr(args[0]);
    uc = PyLong_AsVoidPtr(args[1]);
    control = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(((uc_ctl_fn)fn)(uc, (int)control));
}

static PyObject *hook_address(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromVoidPtr((void *)block_hook);
}

static PyMethodDef methods[] = {
    {"hook_address", hook_address, METH_NOARGS,
     "Address of the C block hook: void hook(uc, address, size, struct icount *)."},
    {"emu_start", (PyCFunction)(void (*)(void))emu_start, METH_FASTCALL,
     "emu_start(uc_emu_start, uc, begin, until) -> uc_err: uc_emu_start(uc, begin, until, 0, 0), GIL held."},
    {"ctl", (PyCFunction)(void (*)(void))ctl, METH_FASTCALL,
     "ctl(uc_ctl, uc, control) -> uc_err: uc_ctl(uc, control) with no arguments, GIL held."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_icount", "Exact instruction counting for Unicorn time slices, per block.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__icount(void)
{
    PyObject *m;

    if (PyType_Ready(&ICountType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ICountType);
    if (PyModule_AddObject(m, "ICount", (PyObject *)&ICountType) < 0) {
        Py_DECREF(&ICountType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
