"""The thread governor: fixed counts are honoured, the pool shrinks to the cores a busy neighbour leaves free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from stage1_tokenizer import threads
from stage1_tokenizer.threads import ThreadGovernor, set_torch_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    threads._governor = None
    torch.set_num_threads(before)


def test_explicit_thread_count_is_applied_and_not_governed():
    assert set_torch_threads(2) == 2
    assert torch.get_num_threads() == 2
    assert threads._governor is None


def test_omp_num_threads_counts_as_the_users_choice(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_torch_threads(None) == 1
    assert threads._governor is None


def test_without_a_user_choice_a_governor_starts(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    count = set_torch_threads(None)
    assert count == threads.usable_cores()
    assert isinstance(threads._governor, ThreadGovernor) and threads._governor.max_threads == count


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_thread_counts_are_named(bad):
    with pytest.raises(ValueError, match="threads="):
        set_torch_threads(bad)


class _ScriptedGovernor(ThreadGovernor):
    """A governor over 4 cores whose /proc samples are scripted: (seconds, busy ticks, own ticks)."""

    def __init__(self, samples, start_threads=None):
        self._samples = iter(samples)
        super().__init__(max_threads=4, interval=0.0, start_threads=start_threads)
        self.cpus = {f"cpu{i}" for i in range(4)}
        self.ticks_per_second = 100

    def _sample(self):
        return next(self._samples)


@pytest.mark.parametrize("other_ticks, expected", [(0, 4), (30, 4), (100, 3), (200, 2), (400, 1)])
def test_governor_gives_up_the_cores_others_use(other_ticks, expected):
    # One second passes; this process used 150 ticks (1.5 cores); others used `other_ticks`.
    governor = _ScriptedGovernor([(0.0, 0, 0), (1.0, 150 + other_ticks, 150)])
    assert governor.update() == expected
    assert torch.get_num_threads() == expected
    assert governor.other_load == pytest.approx(other_ticks / 100)


def test_a_process_told_its_share_starts_on_it_and_grows_once_the_cores_are_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(threads.START_VARIABLE, "1")  # as vqgen compare starts runs side by side
    assert set_torch_threads(None) == 1 and torch.get_num_threads() == 1
    assert threads._governor.max_threads == threads.usable_cores() and threads._governor.threads == 1
    # Its neighbours keep 3 of the 4 cores busy: it stays on its share; they have finished: it takes all 4.
    busy = _ScriptedGovernor([(0.0, 0, 0), (1.0, 400, 100)], start_threads=1)
    assert busy.threads == 1 and busy.update() == 1
    assert _ScriptedGovernor([(0.0, 0, 0), (1.0, 100, 100)], start_threads=1).update() == 4


def test_governor_waits_for_its_interval():
    governor = _ScriptedGovernor([(time.monotonic(), 0, 0)])
    governor.interval = 3600.0
    assert governor.update() == 4  # no second sample is read before the interval (the script has none)


def test_governor_measures_a_real_busy_neighbour():
    governor = ThreadGovernor(max_threads=threads.usable_cores(), interval=0.0)
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        governor._last = governor._sample()
        time.sleep(1.0)  # this process sleeps: the core-time measured is the neighbour's
        governor.update()
    finally:
        neighbour.kill()
        neighbour.wait()
    assert governor.other_load >= 0.7
    assert governor.threads == 1 or governor.threads < governor.max_threads
