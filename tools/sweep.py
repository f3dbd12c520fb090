"""Run one config several times with different overrides, through deepy.py, and compare the runs.

    python tools/sweep.py configs/410M.yml configs/local_setup.yml \
        --set train_iters=100 --set log_interval=1 \
        --run "tp1: num_gpus=1" --run "tp2: model_parallel_size=2 num_gpus=2" \
        --run "tp2_sp: model_parallel_size=2 num_gpus=2 sequence_parallel=true" \
        --out sweep.json

Config files cannot repeat a key (deepy.py refuses duplicates), so each run's YAML is written here: the
files merged left to right, then `--set` values, then the run's own values, replacing earlier ones.
The first run is the reference: the table shows every run's largest loss difference from it over the
iterations both logged, the median tokens/s, and the peak GPU memory the trainer reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalize(key: str) -> str:
    return key.replace("-", "_")


def parse_assignments(items: list[str]) -> dict:
    """`key=value` pairs; values are YAML scalars (`true`, `3e-4`, `[1,2]`); a dotted key sets one entry
    of a block (`zero_optimization.stage=0`)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"sweep: expected key=value, got {item!r}")
        *blocks, leaf = normalize(key.strip()).split(".")
        target = values
        for block in blocks:
            target = target.setdefault(block, {})
        target[leaf] = yaml.safe_load(value)
    return values


def merge(config: dict, values: dict) -> None:
    """Replace keys of `config` by `values`, entry by entry inside blocks (dicts)."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = dict(config[key])
            merge(config[key], value)
        else:
            config[key] = value


def merged_config(paths: list[str], *overrides: dict) -> dict:
    config = {}
    for path in paths:
        with open(path) as handle:
            for key, value in (yaml.safe_load(handle) or {}).items():
                config[normalize(key)] = value
    for values in overrides:
        merge(config, values)
    return config


def parse_run(spec: str) -> tuple[str, dict]:
    """`"name: key=value key=value"` -> (name, values)."""
    name, _, rest = spec.partition(":")
    return name.strip(), parse_assignments(rest.split())


def read_train_records(log_dir: str) -> list[dict]:
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [r for r in (json.loads(line) for line in handle if line.strip()) if r["type"] == "train"]


def run_one(name: str, config: dict, work_dir: str) -> dict:
    log_dir = os.path.join(work_dir, name)
    os.makedirs(log_dir, exist_ok=True)
    config = dict(config, log_dir=log_dir)
    path = os.path.join(work_dir, f"{name}.yml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    print(f"sweep: run {name}", flush=True)
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", path], cwd=REPO_ROOT)
    records = read_train_records(log_dir)
    return {"name": name, "returncode": proc.returncode, "overrides": config, "records": records}


def summarize(runs: list[dict]) -> list[dict]:
    reference = {r["iteration"]: r["loss"] for r in runs[0]["records"]}
    rows = []
    for run in runs:
        records = run["records"]
        losses = {r["iteration"]: r["loss"] for r in records}
        common = sorted(set(losses) & set(reference))
        # skip the first logged interval for speed: it includes warm-up and compilation
        speeds = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
        rows.append({
            "name": run["name"],
            "status": "ok" if run["returncode"] == 0 else f"exit {run['returncode']}",
            "steps": len(records),
            "final_loss": records[-1]["loss"] if records else None,
            "max_abs_loss_diff": max((abs(losses[i] - reference[i]) for i in common), default=None),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "mfu": statistics.median([r.get("mfu") or 0.0 for r in records[1:]]) if len(records) > 1 else None,
            "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0 for r in records), default=None),
            "static_mem_gib": records[-1].get("static_mem_gib") if records else None,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = ["| run | status | steps | final loss | max abs loss diff vs first | tokens/s | MFU | peak mem GiB "
             "| static mem GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['status']} | {row['steps']} | {fmt(row['final_loss'], '.4f')} | "
                     f"{fmt(row['max_abs_loss_diff'], '.4f')} | {fmt(row['tokens_per_s'], ',.0f')} | "
                     f"{fmt(row['mfu'], '.1%')} | {fmt(row['peak_mem_gib'], '.2f')} | "
                     f"{fmt(row['static_mem_gib'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="YAML files, merged left to right")
    parser.add_argument("--set", action="append", default=[], help="key=value for every run")
    parser.add_argument("--run", action="append", required=True, help='"name: key=value ..." (first = reference)')
    parser.add_argument("--work-dir", default="runs/sweep")
    parser.add_argument("--out", help="write runs and summary as JSON here")
    args = parser.parse_args(argv)

    common = parse_assignments(args.set)
    runs = []
    for spec in args.run:
        name, values = parse_run(spec)
        runs.append(run_one(name, merged_config(args.configs, common, values), args.work_dir))
    rows = summarize(runs)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"runs": runs, "summary": rows}, handle, indent=1)
    return 0 if all(run["returncode"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
