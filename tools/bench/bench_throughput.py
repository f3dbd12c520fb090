#!/usr/bin/env python
"""Training throughput and memory of our trainer next to the Hugging Face baselines, on one device.

    python tools/bench/bench_throughput.py --sizes 125M,410M,1.3B [--seq 2048] [--micro-batch 8] \\
        [--steps 20] [--warmup 5] [--baselines eager,compiled] [--out results.json] [--markdown] \\
        [--device cuda|cpu] [--set key=value ...] [--variant "name: key=value ..." ...] [--sync-debug] [--profile] \\
        [--launch-sites PATTERN]

Each (size, implementation) runs in a fresh worker process of this script (`--worker-spec`), one after
the other: DeepSpeed and torch.compile keep process-wide state, and a worker that runs out of memory
(reported as "OOM") or crashes ("FAILED") cannot disturb the others. The parent never touches the GPU.
It writes the synthetic dataset once, collects each worker's JSON, computes tokens/s, TFLOP/s, MFU and the
ratios, prints a table per size and writes `--out` (after every run, so partial results survive).

Implementations: "ours" (always), and the baselines "eager" / "compiled" (transformers, see bench_hf.py) and
"torchtitan" (PyTorch's trainer's Llama model and recipe, Llama-shaped configs only, when the optional
package is installed; see bench_torchtitan.py).
`--set key=value` overrides any config key of our side (YAML scalars; dotted keys reach nested blocks,
e.g. `--set zero_optimization.stage=0`); the baselines take only the model shape from the config.
`--variant "name: key=value ..."` (repeatable) runs ours once per variant, its keys on top of `--set`, so
that one command measures each optimization against the others and the baselines on the same machine.
`--sync-debug` runs one more step per implementation under torch.cuda.set_sync_debug_mode and lists
where the step waits for the GPU. `--launch-sites PATTERN` traces one more step with Python stacks and
lists which code launches the device kernels whose names match the regular expression (e.g. "Memset").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
for path in (REPO_ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_config import SIZE_CONFIGS, config_path, parse_set, vocab_for  # noqa: E402
from bench_data import ensure_synthetic_dataset, tokens_needed  # noqa: E402
from bench_report import label, render_markdown, render_text  # noqa: E402
from bench_stats import add_ratios, summarize_step_times, throughput  # noqa: E402

BASELINES = ("eager", "compiled", "torchtitan")
LOG_TAIL_LINES = 25


# ------------------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="125M,410M,1.3B",
                        help=f"comma-separated sizes ({', '.join(SIZE_CONFIGS)}) or YAML config paths")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step, on every side (default 1); a step then holds "
                             "micro-batch x grad-accum sequences")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20); the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--timing", choices=("events", "synchronized"), default="events",
                        help="events (default): steps back to back as in training, each timed by CUDA events; "
                             "synchronized: each step alone with the device synchronized around it (a few ms per "
                             "step more: the queue refills at every step). CPU: host clock either way")
    parser.add_argument("--baselines", default="eager,compiled",
                        help="comma-separated subset of eager,compiled,torchtitan; empty for none "
                             "(torchtitan: Llama-shaped configs, needs the torchtitan package)")
    parser.add_argument("--out", help="write every number as JSON here")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table for docs/PERFORMANCE.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of our side (repeatable), e.g. --set torch_compile=true")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar='"NAME: KEY=VALUE ..."',
                        help="run ours once per variant (repeatable), each with these overrides on top of --set; "
                             'e.g. --variant "base:" --variant "immediate: bf16.immediate_grad_update=true". '
                             "All variants and the baselines share one run, so their ratios compare like with like")
    parser.add_argument("--sync-debug", action="store_true",
                        help="after timing, run one step with torch.cuda.set_sync_debug_mode and list host syncs")
    parser.add_argument("--launch-sites", default=None, metavar="PATTERN",
                        help="after timing, trace one step with Python stacks and list where the kernels whose "
                             "names match this regular expression are launched from (cuda)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 2 more steps and print the top operators by device time")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU in TFLOP/s (default: from the GPU name, e.g. H100 989)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "neox_bench"),
                        help="synthetic data, index caches and worker logs (default: $TMPDIR/neox_bench)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker before it is killed")
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.seq < 1 or args.micro_batch < 1 or args.grad_accum < 1:
        parser.error("--steps >= 1, --warmup >= 0, --seq >= 1, --micro-batch >= 1 and --grad-accum >= 1 are required")
    return args


def parse_variants(items: list[str]) -> list[tuple[str | None, dict]]:
    """`["base:", "imm: bf16.immediate_grad_update=true"]` -> [("base", {}), ("imm", {...})];
    no --variant at all -> [(None, {})] (one unnamed run of ours)."""
    if not items:
        return [(None, {})]
    variants = []
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name.strip()):
            raise ValueError(f"--variant {item!r}: expected \"name: key=value ...\" with a name of letters, digits, "
                             f"'_', '.', '-', e.g. --variant \"base:\"")
        variants.append((name.strip(), parse_set(rest.split())))
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must differ, got {names}")
    return variants


def parse_baselines(text: str) -> list[str]:
    names = [b.strip() for b in (text or "").split(",") if b.strip()]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise SystemExit(f"unknown baseline(s) {unknown}: choose from {', '.join(BASELINES)}")
    return names


# ------------------------------------------------------------------------------------------------------
# worker: one (size, implementation) in this process

def worker_main(spec: dict, result_file: str) -> int:
    """Run one measurement and write its JSON to `result_file`; OOM and errors become a status."""
    import torch

    from bench_config import build_neox_args
    from bench_timing import environment
    from megatron.training.metrics import default_peak_flops, flops_per_token

    result = {"size": spec["size"], "impl": spec["impl"], "variant": spec.get("variant")}
    try:
        if spec["device"] == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        args = build_neox_args(spec)
        env = environment(spec["device"])
        peak = spec.get("peak_flops") or (default_peak_flops(env["device_name"]) if spec["device"] == "cuda" else None)
        result.update({
            "env": env,
            "peak_flops": peak,
            "flops_per_token": flops_per_token(args.model, args.derived, args.model.seq_length),
            "flops_per_token_causal": flops_per_token(args.model, args.derived, args.model.seq_length, causal=True),
            "shape": {"num_layers": args.model.num_layers, "hidden_size": args.model.hidden_size,
                      "heads": args.model.num_attention_heads, "padded_vocab": args.derived.padded_vocab_size,
                      "flops_per_token": flops_per_token(args.model, args.derived, args.model.seq_length)},
        })
        if spec["impl"] == "ours":
            from bench_ours import run_ours

            result.update(run_ours(spec, args))
        elif spec["impl"] == "torchtitan":
            from bench_torchtitan import run_torchtitan

            result.update(run_torchtitan(spec, args))
        else:
            from bench_hf import run_hf

            result.update(run_hf(spec, args, compiled=spec["impl"] == "compiled"))
        result["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - every failure is reported in the table, not raised
        traceback.print_exc()
        out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
        result["status"] = "OOM" if out_of_memory else "FAILED"
        result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    with open(result_file, "w") as handle:
        json.dump(result, handle)
    return 0


# ------------------------------------------------------------------------------------------------------
# parent: data, workers, numbers, report

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git_commit() -> str | None:
    """The short commit of this checkout, with "+dirty" when tracked files differ from it; None when the
    code does not sit at the top of its own git work tree (e.g. an exported copy inside another
    repository, whose HEAD says nothing about the code that runs)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or os.path.realpath(top) != os.path.realpath(REPO_ROOT):
        return None
    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit or None


def worker_env(device: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each worker is its own single-process world
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def run_worker(spec: dict, cache_dir: str, timeout: int) -> dict:
    """Run one worker process to completion; returns its result (status FAILED/TIMEOUT if it died)."""
    tag = f"{spec['size'].replace('/', '_')}_{spec['impl']}" + (f"_{spec['variant']}" if spec.get("variant") else "")
    log_path = os.path.join(cache_dir, "logs", f"{tag}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    result_file = os.path.join(cache_dir, "logs", f"{tag}.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    spec = dict(spec, master_port=free_port())
    command = [sys.executable, os.path.abspath(__file__), "--worker-spec", json.dumps(spec),
               "--result-file", result_file]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, env=worker_env(spec["device"]), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    if os.path.exists(result_file):
        with open(result_file) as handle:
            result = json.load(handle)
    else:
        tail = log_tail(log_path)
        status = "TIMEOUT" if returncode is None else ("OOM" if "out of memory" in tail.lower() else "FAILED")
        result = {"size": spec["size"], "impl": spec["impl"], "variant": spec.get("variant"), "status": status,
                  "error": f"worker exited with {returncode}" if returncode is not None else f"over {timeout} s"}
    result["log"] = log_path
    if result["status"] != "ok":
        print(f"[bench] {spec['size']} {label(spec['impl'], spec.get('variant'))}: {result['status']} ({result.get('error', '')}); "
              f"last lines of {log_path}:\n{log_tail(log_path)}", file=sys.stderr)
    return result


def finish_run(run: dict) -> dict:
    """Add the step-time summary and throughput numbers to a worker's result."""
    if run.get("status") == "ok":
        run.update(summarize_step_times(run["step_times_s"]))
        run.update(throughput(run["tokens_per_step"], run["median_step_s"], run["flops_per_token"],
                              run.get("peak_flops"), run.get("flops_per_token_causal")))
    return run


def build_meta(opts, sizes, baselines, device, runs) -> dict:
    first_ok = next((r for r in runs if r.get("env")), {})
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device,
        "env": first_ok.get("env"),
        "peak_flops": first_ok.get("peak_flops"),
        "sizes": sizes,
        "baselines": baselines,
        "seq": opts.seq,
        "micro_batch": opts.micro_batch,
        "grad_accum": opts.grad_accum,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "timing": opts.timing,
        "overrides": parse_set(opts.overrides),
        "variants": {name: extra for name, extra in parse_variants(opts.variants) if name},
        "command": " ".join([os.path.relpath(os.path.abspath(__file__), REPO_ROOT)] + sys.argv[1:]),
    }


def write_json(path: str, meta: dict, runs: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"meta": meta, "runs": runs}, handle, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.worker_spec:
        return worker_main(json.loads(opts.worker_spec), opts.result_file)

    import torch  # the parent only asks whether CUDA exists (no context is created)

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [s.strip() for s in opts.sizes.split(",") if s.strip()]
    baselines = parse_baselines(opts.baselines)
    try:
        for size in sizes:
            config_path(size)
        overrides = parse_set(opts.overrides)
        variants = parse_variants(opts.variants)
    except ValueError as err:  # ConfigError is a ValueError too
        raise SystemExit(f"bench_throughput.py: {err}") from None
    # --profile: 2 traced steps, 5 phase-timed, 2 under cProfile
    extra_steps = (1 if opts.sync_debug else 0) + (2 + 5 + 2 if opts.profile else 0) + (1 if opts.launch_sites else 0)
    iterations = opts.warmup + opts.steps + extra_steps + 2

    runs: list[dict] = []
    for size in sizes:
        prefix = ensure_synthetic_dataset(os.path.join(opts.cache_dir, "data"), vocab_for(size),
                                          tokens_needed(opts.micro_batch * opts.grad_accum, opts.seq, iterations))
        jobs = [("ours", name, {**overrides, **extra}) for name, extra in variants]
        jobs += [(impl, None, overrides) for impl in baselines]
        for impl, variant, job_overrides in jobs:
            spec = {"size": size, "impl": impl, "variant": variant, "device": device, "seq": opts.seq,
                    "micro_batch": opts.micro_batch, "grad_accum": opts.grad_accum, "steps": opts.steps,
                    "warmup": opts.warmup, "timing": opts.timing,
                    "extra_steps": extra_steps, "overrides": job_overrides,
                    "data_prefix": prefix, "cache_dir": opts.cache_dir, "sync_debug": opts.sync_debug,
                    "profile": opts.profile, "launch_sites": opts.launch_sites,
                    "peak_flops": opts.peak_tflops * 1e12 if opts.peak_tflops else None}
            print(f"[bench] {size} {label(impl, variant)} ...", file=sys.stderr, flush=True)
            run = finish_run(run_worker(spec, opts.cache_dir, opts.timeout))
            runs.append(run)
            if run["status"] == "ok":
                print(f"[bench] {size} {label(impl, variant)}: {run['tokens_per_s']:,.0f} tokens/s, "
                      f"{1e3 * run['median_step_s']:.1f} ms/step", file=sys.stderr, flush=True)
            add_ratios(runs, baselines)
            if opts.out:
                write_json(opts.out, build_meta(opts, sizes, baselines, device, runs), runs)

    meta = build_meta(opts, sizes, baselines, device, runs)
    for run in runs:
        if run.get("profile"):
            print(f"\n--- profile: {run['size']} {label(run['impl'], run.get('variant'))} (2 steps) ---\n{run['profile']}")
        if run.get("launch_sites"):
            print(f"\n--- launch sites: {run['size']} {label(run['impl'], run.get('variant'))} ---\n{run['launch_sites']}")
        if run.get("phases_ms"):
            print(f"--- phases per micro-batch: {run['size']} {label(run['impl'], run.get('variant'))} (median of 5 steps; "
                  f"GPU span vs host time to issue it) ---")
            for phase, times in run["phases_ms"].items():
                gpu = "-" if times["gpu_ms"] is None else f"{times['gpu_ms']:.2f}"
                print(f"  {phase:9s} GPU {gpu:>8s} ms   host {times['host_ms']:8.2f} ms")
        if run.get("host_profile"):
            print(f"--- host profile: {run['size']} {label(run['impl'], run.get('variant'))} ---")
            print(run["host_profile"])
    print(render_text(meta, runs, baselines))
    if opts.markdown:
        print()
        print(render_markdown(meta, runs, baselines))
    if opts.out:
        write_json(opts.out, meta, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
