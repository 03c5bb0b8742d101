/*
 * Instructions retired, counted exactly and cheaply.
 *
 * Unicorn's own `count=` stop is a per-instruction code hook whose counter is not
 * readable, so a time slice that ends early (HLT, the exit port, a fatal fault)
 * would leave the number of retired instructions unknown.  This is the same hook,
 * written in C so that it costs what Unicorn's costs, with the counter in a struct
 * that Python reads through ctypes:
 *
 *     struct icount { uint64_t counter; uint64_t limit; uc_err (*stop)(void *uc); uint64_t stopped; };
 *
 * The hook runs before each instruction; when the instruction about to run would
 * exceed `limit`, it asks Unicorn to stop, leaving RIP at that instruction, and
 * sets `stopped`, so that the vCPU can tell the end of a slice from Unicorn
 * returning on its own (HLT), whether or not the HLT was the slice's last
 * instruction.  Nothing is added on the path of an instruction that runs.
 * `stop` is Unicorn's uc_emu_stop, passed in by address so that this module does
 * not link against libunicorn.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

struct icount {
    uint64_t counter;
    uint64_t limit;
    int (*stop)(void *uc);
    uint64_t stopped;
};

static void icount_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct icount *ic = (struct icount *)user_data;
    (void)address;
    (void)size;
    if (ic->counter >= ic->limit) {
        ic->stopped = 1;
        ic->stop(uc);
        return;
    }
    ic->counter++;
}

static PyObject *hook_address(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromVoidPtr((void *)icount_hook);
}

static PyMethodDef methods[] = {
    {"hook_address", hook_address, METH_NOARGS,
     "Address of the C code hook: void hook(uc, address, size, struct icount *)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_icount", "Exact instruction counting for Unicorn time slices.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__icount(void)
{
    return PyModule_Create(&module);
}
