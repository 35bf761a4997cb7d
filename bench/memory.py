"""How the benchmarks measure a process's peak memory: the rise of its resident set's high-water mark (Linux).

``peak_rss_rise(fn)`` is meant to run in a fresh child process (see ``in_fresh_process``), after the
process has built its model and run a warm-up, so that only what ``fn`` adds is counted.
"""

import ctypes
import gc
import multiprocessing

RSS_METHOD = ("peak RSS rise: VmHWM - VmRSS around the measured call in a fresh child process (forkserver), after "
              "the model is built and a warm-up gradient has run, then gc, malloc_trim and a VmHWM reset "
              "(/proc/self/clear_refs 5): what the OS sees, torch's tensors, autograd's saved activations, malloc "
              "fragmentation and library scratch buffers included")


def proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def release_free_memory() -> None:
    """Collects garbage and hands malloc's free pages back to the OS, so that the RSS is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_rise(fn):
    """(fn(), bytes by which the peak RSS rose above the RSS before the call)."""
    release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    baseline = proc_status_kib("VmRSS")
    value = fn()
    return value, (proc_status_kib("VmHWM") - baseline) * 1024


def in_fresh_process(fn, *args, preload=()):
    """fn(*args) in a fresh process forked from a forkserver that has imported only `preload`."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)
