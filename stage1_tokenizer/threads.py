"""CPU threading for a shared machine: torch's intra-op threads follow the cores other processes leave free.

PyTorch's CPU kernels run on OpenMP (libgomp on Linux), whose idle workers spin for up to ~300k iterations at
every barrier before they sleep. On an idle machine that spinning is what makes small kernels fast. On a CPU
shared with any other busy process it is ruinous: a sibling thread is often descheduled, so every parallel
region waits out a scheduler tick while its partner burns the core it needs (a 2-core training beside one busy
process ran 2.5x slower than on one thread; README, "Threads").

So vqgen keeps the spinning and instead sizes the thread pool: `ThreadGovernor` measures, about once a second,
how much CPU time the other processes took on this process's cores (/proc/stat minus /proc/self/stat) and
sets torch's thread count to the cores left free. Training and sampling loops call `rebalance_threads()`,
which costs a clock read between checks. A thread count the user chose (`--threads`, OMP_NUM_THREADS) is
never changed. A process started beside others it shares the cores with (`vqgen compare`'s side-by-side runs) is
told its share through VQGEN_THREADS_START: it starts on that many threads, so the work before and after its loop
(loading data, encoding codes, evaluating), where nothing rebalances, never oversubscribes the cores; its loop
then takes more once the others have finished.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

CHECK_INTERVAL_S = 1.0  # long enough to average over scheduler ticks, short against any training run
# Share of a core the other processes must take before a thread is given up (an idle machine's background
# noise is well under 0.1 core; one busy neighbour takes 0.6-1.0 core).
OTHER_LOAD_THRESHOLD = 0.5
START_VARIABLE = "VQGEN_THREADS_START"  # a governed process's first thread count (its share of the cores)


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def user_threads() -> int | None:
    """The thread count the user fixed through OMP_NUM_THREADS, if any."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


class ThreadGovernor:
    """Sets torch's intra-op thread count to the cores that other processes leave free, re-checked each second."""

    def __init__(self, max_threads: int, interval: float = CHECK_INTERVAL_S, start_threads: int | None = None):
        self.max_threads = max_threads
        self.interval = interval
        self.ticks_per_second = os.sysconf("SC_CLK_TCK")
        try:
            self.cpus = {f"cpu{index}" for index in os.sched_getaffinity(0)}
            self._last = self._sample()
        except (AttributeError, OSError, ValueError, IndexError):
            self._last = None  # no /proc (not Linux): nothing to measure, the pool keeps max_threads
        self.threads = min(start_threads or max_threads, max_threads)
        self.other_load = 0.0

    def _sample(self) -> tuple[float, int, int]:
        """(monotonic seconds, busy ticks of this process's cores, this process's own CPU ticks, its ended
        children's included)."""
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name in self.cpus:
                # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
                values = [int(v) for v in fields[:8]]
                busy += sum(values) - values[3] - values[4]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        # utime + stime, and those of its children once they ended (a side-by-side timing's processes): not others'
        return time.monotonic(), busy, sum(int(value) for value in own[11:15])

    def measure_other_load(self) -> float | None:
        """The cores other processes kept busy on this process's cores since the last measurement (None without
        /proc); starts the next measurement."""
        if self._last is None:
            return None
        now = self._sample()
        elapsed = max((now[0] - self._last[0]) * self.ticks_per_second, 1e-9)
        self.other_load = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / elapsed
        self._last = now
        return self.other_load

    def update(self) -> int:
        """Re-measure if a check is due and resize the pool; returns the thread count in force."""
        if self._last is None or time.monotonic() - self._last[0] < self.interval:
            return self.threads
        import torch

        self.measure_other_load()
        free = len(self.cpus) - self.other_load
        threads = self.max_threads if self.other_load < OTHER_LOAD_THRESHOLD else max(1, math.floor(free + 0.5))
        self.threads = min(self.max_threads, threads)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads


_governor: ThreadGovernor | None = None


def set_torch_threads(threads: int | None) -> int:
    """Fix torch's thread count to `threads`, or (None) follow the free cores unless OMP_NUM_THREADS is set."""
    global _governor
    import torch

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} must be an integer >= 1")
    fixed = threads or user_threads()
    if fixed:
        _governor, count = None, fixed
    else:
        start = os.environ.get(START_VARIABLE, "").strip()
        _governor = ThreadGovernor(usable_cores(), start_threads=int(start) if start.isdigit() else None)
        count = _governor.threads
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def rebalance_threads() -> None:
    """Let the governor (if set_torch_threads started one) resize the pool; cheap enough to call every step."""
    if _governor is not None:
        _governor.update()
