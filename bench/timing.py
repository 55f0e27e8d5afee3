"""What every timed loop of the benchmark shares."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while timing, after one collection (as timeit
    does): a collection's pause depends on the whole process's heap, not on the call that
    happens to trigger it, and would land on whichever competitor allocates the most Python
    objects. Reference counting still frees every tensor at once."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
