"""The machine a measurement ran on, and whether anything else was using its CPUs meanwhile.

Timings on a shared 2-core machine are only worth reporting when nothing else ran beside them,
so every bench script describes the machine, waits for it to be quiet before it measures and
records how much CPU other processes took during the measurement (``CpuWatch``).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Dict, List, Optional, Set, Tuple

import torch

__all__ = ["describe_machine", "cpu_ticks", "own_process_tree", "CpuWatch", "wait_until_quiet"]

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def describe_machine() -> Dict[str, object]:
    """CPU model, core count, memory, torch version and threads: what a table's reader needs."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as handle:
            memory_gib = round(int(handle.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info = {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "memory_gib": memory_gib,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": [round(v, 2) for v in os.getloadavg()]}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def _read_stat(pid: str) -> Optional[Tuple[int, int, str]]:
    """(parent pid, user+system ticks, command name) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), name


def cpu_ticks() -> Dict[int, Tuple[int, int, str]]:
    """pid -> (parent pid, CPU ticks used so far, command name) for every process."""
    snapshot = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(entry)
            if stat is not None:
                snapshot[int(entry)] = stat
    return snapshot


def own_process_tree(snapshot: Dict[int, Tuple[int, int, str]], root: Optional[int] = None) -> Set[int]:
    """``root`` (default: this process) and all its descendants in ``snapshot``."""
    root = os.getpid() if root is None else root
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _, _) in snapshot.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def _busy_ticks() -> int:
    """CPU ticks the whole machine has spent busy (all cores, everything but idle and iowait)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _tree_ticks(snapshot: Dict[int, Tuple[int, int, str]], root: int) -> int:
    """CPU ticks of ``root`` and its live descendants plus the children it has already reaped."""
    tree = own_process_tree(snapshot, root)
    reaped = 0
    try:
        with open(f"/proc/{root}/stat") as handle:
            text = handle.read()
        fields = text[text.rindex(")") + 2:].split()
        reaped = int(fields[13]) + int(fields[14])          # cutime + cstime
    except (OSError, ValueError, IndexError):
        pass
    return sum(snapshot[pid][1] for pid in tree if pid in snapshot) + reaped


class CpuWatch:
    """CPU time other processes (not this one or its children) used between start and stop.

    Counted as the machine's busy time minus this process tree's, so processes that started
    and ended in between (a test run, say) are included. ``stop()`` returns
    ``{"other_cpu_cores": mean cores busy elsewhere, "busiest": the top processes still alive,
    "seconds": wall time, "load_average": ...}``; about 0.0 cores means a quiet machine.
    """

    def __init__(self) -> None:
        self.root = os.getpid()
        self.start_time = time.perf_counter()
        self.start = cpu_ticks()
        self.start_busy = _busy_ticks()
        self.start_mine = _tree_ticks(self.start, self.root)

    def stop(self) -> Dict[str, object]:
        end = cpu_ticks()
        busy = _busy_ticks() - self.start_busy
        mine = _tree_ticks(end, self.root) - self.start_mine
        seconds = max(1e-6, time.perf_counter() - self.start_time)
        tree = own_process_tree(end, self.root) | own_process_tree(self.start, self.root)
        used: List[Tuple[float, int, str]] = []
        for pid, (_, ticks, name) in end.items():
            if pid in tree:
                continue
            before = self.start[pid][1] if pid in self.start else 0
            cores = (ticks - before) / _TICKS_PER_SECOND / seconds
            if cores > 0:
                used.append((cores, pid, name))
        used.sort(reverse=True)
        other = max(0.0, (busy - mine) / _TICKS_PER_SECOND / seconds)
        return {"other_cpu_cores": round(other, 3),
                "busiest": [{"pid": pid, "name": name, "cores": round(c, 3)} for c, pid, name in used[:3]],
                "seconds": round(seconds, 2), "load_average": [round(v, 2) for v in os.getloadavg()]}


def wait_until_quiet(max_other_cores: float = 0.15, probe_seconds: float = 5.0, poll_seconds: float = 60.0,
                     max_wait_seconds: float = 1800.0, log=print) -> Dict[str, object]:
    """Block until other processes use under ``max_other_cores`` cores over a probe window.

    Gives up after ``max_wait_seconds`` (the measurement then goes ahead, flagged by its own
    ``CpuWatch``). Returns the last probe.
    """
    deadline = time.monotonic() + max_wait_seconds
    while True:
        watch = CpuWatch()
        time.sleep(probe_seconds)
        probe = watch.stop()
        if probe["other_cpu_cores"] < max_other_cores or time.monotonic() > deadline:
            return probe
        log(f"[bench] machine busy ({probe['other_cpu_cores']:.2f} cores elsewhere: "
            f"{', '.join(b['name'] + ' ' + str(b['pid']) for b in probe['busiest'])}); waiting {poll_seconds:.0f} s")
        time.sleep(poll_seconds)
