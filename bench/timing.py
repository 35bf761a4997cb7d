"""Timing that holds up on a shared, drifting VM (used by the benchmarks, scripts run from bench/)."""

import random
import resource
import time


def interleaved_min_ms(parts: dict, seconds: float, clock=time.perf_counter) -> tuple[dict, dict]:
    """The fastest call of each of `parts`' functions in ms, calling them in turn (one call each per round, in a
    new order each round) for about `seconds` in all (at least 5 rounds), and each one's mean minor page faults
    per call (first touches of memory the allocator got fresh from the kernel). In turn, because this VM's speed
    drifts over seconds: blocks of one function would each see a different machine. `clock` measures the calls
    (time.process_time: CPU time of this process, which leaves out the time other processes hold the core);
    the `seconds` budget is wall time."""
    for fn in parts.values():
        for _ in range(3):
            fn()
    best, faults, calls = dict.fromkeys(parts, float("inf")), dict.fromkeys(parts, 0), 0
    order, shuffle = list(parts), random.Random(0).shuffle
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 5:
        shuffle(order)  # no part always follows the same one (what it leaves in the caches)
        for name in order:
            before, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, clock()
            parts[name]()
            best[name] = min(best[name], clock() - t)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        calls += 1
    return {name: ms * 1e3 for name, ms in best.items()}, {name: n / calls for name, n in faults.items()}
