"""What the PyTorch twins of medssl's native 3D benchmarks (reconstruction_step.py,
sliding_window.py, voco_step.py) share: the common command-line options, the timing loop and
the JSON report with the fields the Rust side prints (runners/src/bench_3d.rs `Report`).

Not a benchmark itself; each script imports it from its own folder.
"""

import argparse
import json
import resource
import statistics
import time

import torch


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (medssl's: 2 here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")


def setup(args: argparse.Namespace) -> torch.device:
    """Applies --threads, seeds torch's generator and returns --device."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def time_steps(step, warmup: int, steps: int, device: torch.device) -> list:
    """The times in ms of `steps` calls of `step()` after `warmup` untimed ones. `step` ends
    by reading a value back (`.item()`), so on the CPU its work is done when it returns; on
    CUDA the device is synchronised on both sides of each call as well."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(warmup + steps):
        sync()
        tick = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - tick) * 1e3)
    return times


def report(bench: str, times: list, device: torch.device, **settings) -> dict:
    """The report of `times`: median, min and max, the peak memory, then `settings`."""
    return {
        "bench": bench,
        "ms_per_step": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        # ru_maxrss is the peak resident set in KiB on Linux (VmHWM, as the Rust side reads).
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": len(times),
        **settings,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def emit(result: dict, as_json: bool, summary: str) -> None:
    """Prints `result` as one JSON line with --json, else the one-line `summary`."""
    print(json.dumps(result) if as_json else summary)
