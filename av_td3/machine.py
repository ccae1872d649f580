"""The machine a number comes from, in words: recorded with every run (summary.json's provenance) and every
bench, so wall times and speeds are never quoted without it."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """e.g. ``"Intel(R) Xeon(R) Processor, 2 logical cores"``."""
    return f"{cpu_model()}, {os.cpu_count()} logical cores"


# ---------------------------------------------------------------------------------------- threads on a shared machine
WAIT_POLICY_VAR = "OMP_WAIT_POLICY"


def prefer_passive_waiting() -> None:
    """Make torch's OpenMP threads sleep, not spin, while they wait for each other (``OMP_WAIT_POLICY=PASSIVE``),
    unless the user chose a policy. Must run before torch is first imported (OpenMP reads it once, when it
    loads): ``av_td3/__init__.py`` calls it. Spinning threads on cores that other processes also use make every
    multi-threaded op wait for a descheduled thread; measured on the 2-core VM under background load, torch's
    default 2 threads updated 0.3-0.7x as fast as one thread when spinning, and trained 1.02x as fast when passive
    (``av-td3 bench --only busy``, benchmarks/2026-12-07_busy.md)."""
    os.environ.setdefault(WAIT_POLICY_VAR, "PASSIVE")


# ------------------------------------------------------------------------------------- freed memory kept for reuse
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc accepts up to 32 MiB on every 64-bit version
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
freed_memory = "not set yet"  # what keep_freed_memory() made of it, for summary.json's provenance


def keep_freed_memory() -> str:
    """Let glibc's malloc keep the memory torch frees for the next allocation instead of returning it to the
    kernel, unless the user chose for malloc (a ``MALLOC_*`` variable, ``GLIBC_TUNABLES``, or another allocator
    in ``LD_PRELOAD`` such as jemalloc or tcmalloc). Returns what holds, in words, also kept in ``freed_memory``
    for the run's provenance. ``av_td3/__init__.py`` calls it on import.

    An update allocates and frees tensors of 1-10 MB (the batch's float frames, [128, 4, 64, 64] float32, are
    8.4 MB). glibc serves such sizes from fresh ``mmap`` pages, or trims them off the heap's top when freed, so
    every update touched them anew: about 6,500 page faults per default update, 10-15% of its CPU time on the
    2-core VM (benchmarks/2026-12-07_freed_memory.md). Allocations up to ``MMAP_THRESHOLD_BYTES`` now come from the
    heap, and up to ``TRIM_THRESHOLD_BYTES`` of freed heap top is kept: ~20 faults per update, the same values
    (nothing but where the bytes live changes), resident memory about the update's peak working set higher at
    most. Both settings or neither: the trim threshold alone would also switch off glibc's adaptive mmap threshold
    and make things worse."""
    global freed_memory
    freed_memory = _set_malloc()
    return freed_memory


def _set_malloc() -> str:
    chosen = sorted(v for v in os.environ
                    if v.startswith("MALLOC_") or v == "GLIBC_TUNABLES"
                    or (v == "LD_PRELOAD" and "malloc" in os.environ[v]))
    if chosen:
        return f"as set by {', '.join(chosen)}"
    if platform.libc_ver()[0] != "glibc":
        return "the platform's default (not glibc)"
    import ctypes  # here: only glibc has mallopt

    libc = ctypes.CDLL(None)
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return "glibc's default (mallopt refused the mmap threshold)"
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return (f"kept for reuse (glibc mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, "
            f"trim {TRIM_THRESHOLD_BYTES >> 20} MiB)")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a cgroup or ``taskset`` limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_note(threads: int) -> str | None:
    """One line when other processes already keep the usable CPUs busy (the 1-minute load average, taken before
    this run does any work, is at least the CPUs minus one half): what the run does about it. None otherwise."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return None
    cpus = usable_cpus()
    if load < cpus - 0.5:
        return None
    policy = os.environ.get(WAIT_POLICY_VAR, "")
    waiting = ("its threads wait passively (OMP_WAIT_POLICY=PASSIVE), so they give their cores up instead of "
               "spinning" if policy.upper() == "PASSIVE" else
               f"OMP_WAIT_POLICY={policy or 'unset'}: spinning threads can make it several times slower; unset it "
               "or set OMP_WAIT_POLICY=PASSIVE")
    return (f"this machine is busy: load average {load:.1f} on {cpus} usable CPU(s) before this run started. Torch "
            f"trains with {threads} thread(s); {waiting}. Two runs side by side: give each "
            "trainer.torch_threads=1 (docs/performance.md)")
