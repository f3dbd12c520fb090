"""Timing one training step function the same way for every implementation, plus device facts.

`measure(step, ...)`: `warmup` untimed steps (compilation, allocator warm-up, DeepSpeed's first-step
setup), then `steps` timed steps, timed one of two ways:

- "events" (the default): back to back, as training runs them (the trainer waits for the device only at
  log intervals), with a CUDA event recorded on the stream between consecutive steps and one
  synchronization at the end. Step i's time is the device-side time from the event before it to the
  event after it: its kernels plus any time the device waited for the host (launch overhead, data
  loading, a host read inside the step), while host work that overlaps the previous step's kernels is
  hidden, as in training.
- "synchronized": each step on its own, the device synchronized before and after (host clock), so a
  step also pays for filling the empty device queue at its start: a conservative figure, a few ms per
  step above the steady state for a host that runs ahead of the device.

On CPU both are the host clock around each step (the device is the host). Peak memory is counted from a
reset after the warmup, i.e. the steady state of training.

`launch_sites(step, device, pattern)`: traces one more step with the host's operators and Python stacks and
lists where the device kernels whose names match `pattern` (e.g. "Memset") are launched from.

`find_host_syncs(step)`: runs one more step under `torch.cuda.set_sync_debug_mode("warn")` and returns
where it synchronized the host with the GPU (`.item()`, `float(tensor)`, D2H copies, `nonzero`, ...).
"""

from __future__ import annotations

import gc
import os
import time
import traceback
import warnings
from collections import Counter
from typing import Callable

import torch

GIB = 1024 ** 3


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


TIMINGS = ("events", "synchronized")


def measure(step: Callable[[], None], warmup: int, steps: int, device: str, timing: str = "events") -> dict:
    """Run and time `step` (see the module docstring); returns step times and peak memory (GiB, cuda)."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    for _ in range(warmup):
        step()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if device == "cuda" and timing == "events":
        times = _time_back_to_back(step, steps)
    else:
        times = []
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    result = {"step_times_s": times, "peak_alloc_gib": None, "peak_reserved_gib": None}
    if device == "cuda":
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return result



def measure_spec(step: Callable[[], None], spec: dict) -> dict:
    """`measure` with the spec's warmup, steps, device and timing, plus the spec's optional diagnostics:
    `host_syncs` (`--sync-debug`), `profile` (`--profile`) and `launch_sites` (`--launch-sites PATTERN`),
    each over steps of their own."""
    device = spec["device"]
    result = measure(step, spec["warmup"], spec["steps"], device, spec.get("timing", "events"))
    if spec.get("sync_debug"):
        result["host_syncs"] = find_host_syncs(step, device)
    if spec.get("profile"):
        result["profile"] = profile_steps(step, device)
    if spec.get("launch_sites"):
        result["launch_sites"] = launch_sites(step, device, spec["launch_sites"])
    return result

def _time_back_to_back(step: Callable[[], None], steps: int) -> list[float]:
    """Seconds of device time between the CUDA events recorded before and after each of `steps` steps
    run back to back (no synchronization until the last one is issued)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for index in range(steps):
        step()
        events[index + 1].record()
    torch.cuda.synchronize()
    return [events[i].elapsed_time(events[i + 1]) / 1000.0 for i in range(steps)]


def _frames_of_interest(stack: list) -> list[str]:
    """The innermost frames of the stack in this repository or a library we compare (not warnings/bench)."""
    keep = []
    for frame in reversed(stack):
        path = frame.filename
        if "warnings.py" in path or os.sep + "bench" + os.sep in path:
            continue
        if any(part in path for part in ("megatron", "deepspeed", "transformers", "torch" + os.sep + "optim",
                                         "torch" + os.sep + "nn" + os.sep + "utils")):
            keep.append(f"{os.path.relpath(path) if 'megatron' in path else path}:{frame.lineno} ({frame.name})")
        if len(keep) == 3:
            break
    return keep


def find_host_syncs(step: Callable[[], None], device: str) -> list[dict]:
    """Host-device synchronizations inside one call of `step` on cuda: [{"where": [...frames], "count": n,
    "message": ...}], most frequent first. Empty on cpu (nothing to synchronize)."""
    if device != "cuda":
        return []
    found: Counter = Counter()
    messages: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        where = tuple(_frames_of_interest(traceback.extract_stack()[:-1])) or (f"{filename}:{lineno}",)
        found[where] += 1
        messages.setdefault(where, str(message).splitlines()[0][:160])

    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            synchronize(device)
        except Exception as err:  # noqa: BLE001 - the timing already measured must survive
            found[(f"sync-debug step failed: {type(err).__name__}",)] += 1
            messages.setdefault((f"sync-debug step failed: {type(err).__name__}",), str(err)[:160])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"where": list(where), "count": count, "message": messages[where]}
            for where, count in found.most_common()]


KERNEL_CATEGORIES = (
    ("attention", ("sdpa", "flash", "fmha", "attention")),  # before matmul: FA4's CuTe kernels are "cutlass" too
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "wgmma_tensorop")),  # quack's (epilogues included)
    ("optimizer", ("multi_tensor", "adam")),
    ("communication", ("nccl",)),
    ("compiled (triton)", ("triton_",)),
    ("copy / cast", ("copy", "cast", "catarray")),
    ("reduction", ("reduce", "norm")),
    ("elementwise (eager)", ("elementwise", "vectorized")),
)
"""Device-kernel name fragments (lower case) -> category, first match wins; the rest is "other"."""


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def kernel_breakdown(kernels: list[tuple[str, float]], steps: int, top: int = 30) -> str:
    """Text table of device time per step: by category (KERNEL_CATEGORIES) and the `top` kernels.

    `kernels`: (kernel name, device microseconds) for every kernel launched in `steps` steps.
    """
    total = sum(us for _, us in kernels) or 1.0
    by_category: Counter = Counter()
    calls: Counter = Counter()
    by_name: Counter = Counter()
    launches: Counter = Counter()
    for name, us in kernels:
        by_name[name] += us
        launches[name] += 1
    for name, us in by_name.items():  # one category lookup per distinct kernel name
        category = kernel_category(name)
        by_category[category] += us
        calls[category] += launches[name]
    lines = [f"device time per step: {total / steps / 1e3:.2f} ms in {len(kernels) / steps:.0f} kernels",
             f"  {'category':22s} {'ms/step':>8s} {'share':>6s} {'kernels/step':>12s}"]
    for category, us in by_category.most_common():
        lines.append(f"  {category:22s} {us / steps / 1e3:8.2f} {100 * us / total:5.1f}% "
                     f"{calls[category] / steps:12.0f}")
    lines.append(f"  top {top} kernels:")
    for name, us in by_name.most_common(top):
        lines.append(f"  {us / steps / 1e3:8.3f} ms  [{kernel_category(name)}] {name[:110]}")
    return "\n".join(lines)


GAP_BUCKETS_US = (10.0, 100.0)
"""Idle gaps between kernels are reported in three buckets: < 10 us (the device's own kernel-to-kernel
latency on a full queue), 10-100 us, and longer (the queue ran dry: the host was late)."""


def kernel_gaps(kernels: list[tuple[str, float, float]], steps: int, top: int = 8) -> str:
    """Text summary of the device's idle time between kernels.

    `kernels`: (name, start us, end us) of every kernel in `steps` steps, on any stream. A gap is the time
    from the latest end so far to the next kernel's start (overlapping kernels leave none). Returns the
    idle time per step by bucket (GAP_BUCKETS_US) and the `top` longest gaps with the kernels around each.
    """
    ordered = sorted(kernels, key=lambda kernel: kernel[1])
    gaps = []  # (us, kernel that ended last before the gap, kernel that ended the gap)
    latest_end, latest_name = None, None
    for name, start, end in ordered:
        if latest_end is not None and start > latest_end:
            gaps.append((start - latest_end, latest_name, name))
        if latest_end is None or end > latest_end:
            latest_end, latest_name = end, name
    small, medium = GAP_BUCKETS_US
    buckets = {f"< {small:.0f} us": [g for g, _, _ in gaps if g < small],
               f"{small:.0f}-{medium:.0f} us": [g for g, _, _ in gaps if small <= g < medium],
               f">= {medium:.0f} us": [g for g, _, _ in gaps if g >= medium]}
    total = sum(g for g, _, _ in gaps)
    lines = [f"device idle between kernels: {total / steps / 1e3:.2f} ms per step in {len(gaps) / steps:.0f} gaps"]
    for label, values in buckets.items():
        lines.append(f"  {label:>10s}: {sum(values) / steps / 1e3:6.2f} ms in {len(values) / steps:5.0f} gaps")
    if gaps:
        lines.append(f"  longest {min(top, len(gaps))} gaps (kernel after <- kernel before):")
        for us, before, after in sorted(gaps, key=lambda gap: gap[0], reverse=True)[:top]:
            lines.append(f"  {us / 1e3:8.3f} ms  {after[:70]} <- {before[:70]}")
    by_pair: Counter = Counter()
    pair_count: Counter = Counter()
    for us, before, after in gaps:
        if us >= small:  # the ones the host caused, summed by where they fall (repeats show up here)
            by_pair[(after, before)] += us
            pair_count[(after, before)] += 1
    if by_pair:
        lines.append(f"  gaps >= {small:.0f} us summed by kernel pair (per step):")
        for (after, before), us in by_pair.most_common(top):
            lines.append(f"  {us / steps / 1e3:8.3f} ms {pair_count[(after, before)] / steps:5.1f}x  "
                         f"{after[:60]} <- {before[:60]}")
    return "\n".join(lines)


def most_launched(kernels: list[tuple[str, float, float]], steps: int, top: int = 12) -> str:
    """The `top` kernel names by launches per step (each launch costs the host and the device a few us)."""
    launches = Counter(name for name, _, _ in kernels)
    lines = [f"most launched kernels (per step, of {len(kernels) / steps:.0f}):"]
    for name, count in launches.most_common(top):
        lines.append(f"  {count / steps:6.0f}x  [{kernel_category(name)}] {name[:110]}")
    return "\n".join(lines)


def host_profile(step: Callable[[], None], steps: int = 2, top: int = 25) -> str:
    """cProfile over `steps` calls of `step`: the Python functions that take the host's time (own time,
    i.e. without callees), per step. When the host takes longer to issue a step than the GPU takes to
    run it, these are what to cut (or replay as CUDA graphs)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # by own time
    total = sum(value[2] for _, value in stats.stats.items())
    lines = [f"host time per step: {1e3 * total / steps:.1f} ms of Python (own time, all functions); top {top}:"]
    for (path, line, name), (_, calls, own, cumulative, _) in rows[:top]:
        where = f"{os.path.basename(path)}:{line}" if path != "~" else "(builtin)"
        lines.append(f"  {1e3 * own / steps:7.2f} ms own {1e3 * cumulative / steps:8.2f} ms cum "
                     f"{calls / steps:6.0f}x  {name[:60]} [{where}]")
    return "\n".join(lines)


def profile_steps(step: Callable[[], None], device: str, steps: int = 2, rows: int = 25) -> str:
    """torch.profiler over `steps` calls of `step`, back to back. On cuda: device time per step by kernel
    category and the top kernels (kernel_breakdown), the most launched kernels and the device's idle time
    between kernels (kernel_gaps); on cpu: the top `rows` operators by self CPU time. Shows where a
    step's time goes. On cuda only the device's activity is traced: tracing every CPU operator too made the
    idle gaps between kernels ~3x longer than unprofiled (410M on an H200: 16.4 ms
    against ~5 ms a step), which hid where the real ones are."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"

    def traced(activities):
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronize(device)
        return prof

    if not cuda:
        prof = traced([ProfilerActivity.CPU])
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    header = ""
    kernels = _device_kernels(traced([ProfilerActivity.CUDA]), DeviceType.CUDA)
    if not kernels:  # a torch whose device-only trace lists no kernels: trace the host too (longer gaps)
        header = "(device-only trace listed no kernels: traced with the host's operators, gaps inflated)\n"
        kernels = _device_kernels(traced([ProfilerActivity.CPU, ProfilerActivity.CUDA]), DeviceType.CUDA)
    durations = [(name, end - start) for name, start, end in kernels]
    return header + "\n".join([kernel_breakdown(durations, steps), most_launched(kernels, steps),
                                kernel_gaps(kernels, steps)])


def launch_sites(step: Callable[[], None], device: str, pattern: str, top: int = 20) -> str:
    """One traced call of `step` (host operators with Python stacks, and the device): the host operators
    that launched the device kernels whose names match the regular expression `pattern`, most kernels
    first, each with its operator chain (innermost first) and the innermost frames of this repository or
    the kernel libraries. Tells which code issues, say, the step's memsets. cuda only."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return "(launch sites are traced on cuda only)"
    regex = re.compile(pattern)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        step()
        synchronize(device)
    sites: Counter = Counter()
    device_us: Counter = Counter()
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue
        kernels = [kernel for kernel in getattr(event, "kernels", []) if regex.search(kernel.name)]
        if not kernels:
            continue
        chain, frames, parent = [], [], event
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            if not frames:
                frames = [frame for frame in (parent.stack or [])
                          if any(part in frame for part in ("megatron", "quack", "deepspeed", "torch/_inductor",
                                                            "torch/autograd", "torchtitan", "transformers"))][:4]
            parent = parent.cpu_parent
        key = (" < ".join(chain), " | ".join(frames) or "(no Python frame)")
        sites[key] += len(kernels)
        device_us[key] += sum(kernel.duration for kernel in kernels)
    total = sum(sites.values())
    lines = [f"{total} kernels matching {pattern!r} in one step, by launching operator:"]
    for (chain, frames), count in sites.most_common(top):
        lines.append(f"  {count:5d}x {device_us[(chain, frames)] / 1e3:7.3f} ms  {chain}\n           at {frames}")
    return "\n".join(lines)


def _device_kernels(prof, cuda_type) -> list[tuple[str, float, float]]:
    """(name, start, end) of every device kernel in the trace; user annotations (e.g.
    "Optimizer.step#AdamW.step") span kernels already counted and are left out."""
    return [(event.name, event.time_range.start, event.time_range.end) for event in prof.events()
            if event.device_type == cuda_type and not getattr(event, "is_user_annotation", False)
            and "#" not in event.name]


class PhaseTimedEngine:
    """Stands in for a DeepSpeed engine and times its three calls per micro-batch.

    Around `engine(...)` (forward), `engine.backward(loss)` and `engine.step()` it records a CUDA event and
    the host clock. The event gaps are GPU-timeline spans (kernels plus any idle wait inside the phase);
    the host gaps are how long Python took to issue the phase. A phase whose host time exceeds its GPU
    span is host-bound: the GPU waits for launches there. Everything else is passed to the engine.
    """

    PHASES = ("forward", "backward", "step")

    def __init__(self, engine):
        self._engine = engine
        self._cuda = torch.cuda.is_available()
        self._marks: list = []  # (name, cuda event or None, host seconds), in call order

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True) if self._cuda else None
        if event is not None:
            event.record()
        self._marks.append((name, event, time.perf_counter()))

    def __call__(self, *args, **kwargs):
        self._mark("forward")
        out = self._engine(*args, **kwargs)
        self._mark("backward")
        return out

    def backward(self, *args, **kwargs):
        out = self._engine.backward(*args, **kwargs)
        self._mark("step")
        return out

    def step(self, *args, **kwargs):
        out = self._engine.step(*args, **kwargs)
        self._mark("end")
        return out

    def spans_ms(self) -> dict:
        """{phase: {"gpu_ms": median (None without CUDA), "host_ms": median}} over the calls so far."""
        if self._cuda:
            torch.cuda.synchronize()
        gpu = {phase: [] for phase in self.PHASES}
        host = {phase: [] for phase in self.PHASES}
        for (name, event, clock), (_, next_event, next_clock) in zip(self._marks, self._marks[1:]):
            if name in gpu:
                gpu[name].append(event.elapsed_time(next_event) if event is not None else None)
                host[name].append(1e3 * (next_clock - clock))
        return {phase: {"gpu_ms": None if None in gpu[phase] else _median(gpu[phase]),
                        "host_ms": _median(host[phase])}
                for phase in self.PHASES if gpu[phase]}


def _median(values: list) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def phase_spans(trainer, steps: int = 5) -> dict:
    """Run `steps` more training steps with the trainer's engine behind a PhaseTimedEngine."""
    timed = PhaseTimedEngine(trainer.engine)
    trainer.engine = timed
    try:
        for _ in range(steps):
            trainer.train_step()
        return timed.spans_ms()
    finally:
        trainer.engine = timed._engine


def free_device_memory() -> None:
    """Collect garbage and return cached blocks to the device (between phases of one worker)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def environment(device: str) -> dict:
    """Device name and library versions, reported by every worker (the parent never touches the GPU)."""
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    info["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for name in ("deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # a missing library is reported, not fatal
            info[name] = None
    return info
