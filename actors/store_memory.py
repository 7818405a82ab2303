"""Ray's object store memory, mapped into a writer's page tables ahead of use.

Every block an ingest actor reads is written into Ray's object store: one
shared-memory file (``/dev/shm/plasma*`` on Linux) that every worker maps
whole. The first write to each 4 KiB page of it in a process costs a page
fault: ~3.5 us for a page nobody wrote yet (the kernel allocates and zeroes
it), ~1.5 us for one another process wrote first. A 100k-row, 20-feature
shard is ~2,300 pages, ~8 ms of the actor's CPU: a third of reading and
validating the shard, on a path where two actors keep two cores busy.

``prefault_object_store(n)`` asks the kernel to fill in this process's page
tables for the first ``n`` bytes of the store at once
(``madvise(MADV_POPULATE_WRITE)``, Linux >= 5.14): no data is written, the
pages are only allocated and mapped. The store's allocator hands out its
region from the low end and reuses what was freed, so a prefix about twice
the buffer's byte bound covers what a run writes (the buffer's blocks, the
chunks on their way, the objects freed but not yet deleted). Measured here
(2 cores): ~0.6 s per GB in the first process that touches the memory,
~0.15 s per GB in each one after it. It commits that much shared memory up
front, which a long run fills anyway. A writer takes work once the first
``SYNC_BYTES`` are in (~0.6 s); the rest goes in on a thread meanwhile, so
that a large buffer (tens of GB: tens of seconds) delays neither the first
shard nor a restarted actor's return.

Anything else (macOS, an older kernel, a store on disk or on huge pages, no
store mapped yet) is left alone: the writes then fault as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import time
from pathlib import Path

__all__ = ["prefault_object_store", "store_mapping"]

log = logging.getLogger(__name__)
MADV_POPULATE_WRITE = 23
"""Linux >= 5.14 (``include/uapi/asm-generic/mman-common.h``)."""
STORE_PREFIX = "/dev/shm/plasma"
"""Where Ray creates its object store's file on Linux (tmpfs)."""
SYNC_BYTES = 1 << 30
"""At most this much is prefaulted before a writer takes work; the rest on a thread."""


def store_mapping(maps: str | None = None) -> tuple[int, int] | None:
    """``(address, length)`` of Ray's object store mapped in this process (from
    ``/proc/self/maps``, or ``maps``), or None where there is none on tmpfs."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(STORE_PREFIX) and fields[1][3] == "s" and "w" in fields[1]:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            return start, end - start
    return None


def prefault_object_store(end: int, begin: int = 0) -> int:
    """Map bytes ``[begin, end)`` of Ray's object store into this process's page
    tables, writable; returns the bytes mapped (``end`` capped at the store's
    size; 0 where nothing was done). ``begin`` is a multiple of the page size."""
    mapping = store_mapping() if end > begin else None
    if mapping is None:
        if end > begin:
            log.debug("no object store on %s* mapped in this process: not prefaulted", STORE_PREFIX)
        return 0
    start, length = mapping
    nbytes = min(end, length) - begin
    if nbytes <= 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    t0 = time.perf_counter()
    if libc.madvise(start + begin, nbytes, MADV_POPULATE_WRITE) != 0:  # ctypes drops the GIL meanwhile
        err = ctypes.get_errno()
        why = "this kernel has no MADV_POPULATE_WRITE (Linux >= 5.14)" if err == errno.EINVAL else errno.errorcode.get(err, str(err))
        log.info("object store not prefaulted: %s", why)
        return 0
    log.info("object store: %.0f MiB from %.0f MiB prefaulted in %.2f s", nbytes / 2**20, begin / 2**20,
             time.perf_counter() - t0)
    return nbytes
