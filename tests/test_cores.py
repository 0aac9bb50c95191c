"""Noticing other processes that take CPU time from a training run (training/cores.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from matryoshka.training.cores import CoreWatch, available_cores, process_times, watch_cores

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads Linux /proc")

BUSY = "while True: pass"


def test_process_times_parse_stat_lines_whose_command_has_spaces_and_parentheses(tmp_path):
    ticks = os.sysconf("SC_CLK_TCK")
    fields = ["S", "77"] + ["0"] * 9 + [str(3 * ticks), str(ticks)] + ["0"] * 30
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "stat").write_text(f"123 (evil) name (x)) {' '.join(fields)}\n")
    (tmp_path / "456").mkdir()  # ended between the listing and the read: no stat file
    (tmp_path / "self").mkdir()
    times = process_times(tmp_path)
    assert list(times) == [123]
    assert times[123].parent == 77 and times[123].cpu_seconds == pytest.approx(4.0)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_another_busy_process_is_named_once_and_this_process_and_its_children_are_not_counted():
    # A grandchild, reparented when its launcher exits: for the watch it is someone else's process.
    busy = f"[sys.executable, '-c', {BUSY!r}], stdout=subprocess.DEVNULL"  # else run() would wait for it
    launcher = [sys.executable, "-c", f"import subprocess, sys; print(subprocess.Popen({busy}).pid)"]
    other = int(subprocess.run(launcher, stdout=subprocess.PIPE, text=True, check=True).stdout)
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    messages = []
    try:
        watch = CoreWatch(messages.append)
        _spin(0.6)  # this process is busy too
        time.sleep(0.6)
        used = watch.usage()
        assert other in used and used[other] > 0.3
        assert os.getpid() not in used and child.pid not in used
        time.sleep(0.8)
        total = watch.check()
        time.sleep(0.5)
        watch.check()
    finally:
        os.kill(other, signal.SIGKILL)
        child.kill()
        child.wait()
    assert total >= 0.5
    assert len(messages) == 1, messages  # named the first time only
    assert f"by pid {other}, " in messages[0] and "while True" in messages[0]
    assert f"of the {available_cores()} cores" in messages[0] and "OMP_NUM_THREADS" in messages[0]


def test_more_threads_than_cores_is_said_at_once_and_only_cpu_runs_are_watched():
    messages = []
    assert watch_cores(torch.device("meta"), messages.append) is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(available_cores() + 1)
        assert isinstance(watch_cores(torch.device("cpu"), messages.append), CoreWatch)
    finally:
        torch.set_num_threads(threads)
    assert len(messages) == 1 and f"OMP_NUM_THREADS={available_cores()}" in messages[0]


def test_a_training_run_logs_how_busy_the_other_processes_were(tmp_path):
    from matryoshka.config.presets import load_run_config
    from matryoshka.training.trainer import Trainer

    config = load_run_config("tiny", [f"run_dir={tmp_path}", "train.steps=10", "train.sample_every=100"])
    Trainer(config, quiet=True).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all(record["other_cpu_cores"] >= 0 for record in records)
