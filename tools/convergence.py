#!/usr/bin/env python
"""Train a suite of configurations that must learn the same function, and prove it with loss curves.

    python tools/convergence.py configs/convergence/cpu-tiny.yml --out runs/convergence/cpu-tiny \\
        [--variant "name: key=value ..."]... [--set key=value]... [--only a,b] [--skip c,d] \\
        [--timeout SECONDS] [--reuse]

Trains the suite's references and variants through deepy.py, one after the other (progress: which run,
step, loss), reads each run's metrics.jsonl and compares every variant with its reference step by step
(tools/convergence_suite/compare.py). Writes, after every run (a crash of one run keeps the rest):
  DIR/loss_curves.png   train and validation loss by step, and each variant's |difference| from its
                        reference with the tolerance (one colour per run, PASS/FAIL in the legend)
  DIR/report.md         per run: max and mean |Δ train loss|, max |Δ valid loss|, final losses, tokens/s,
                        peak memory, pass/fail and the tolerance applied; where each failure left the band
  DIR/results.json      everything above plus the curves and per-step differences
  DIR/runs/<name>/      each run's config, logs and console output
Exit status: 0 when every variant is within tolerance, 1 when any is not (or crashed), 2 on a usage, suite
or config error (every run's config is validated before the first launch).

`--set` and `--variant` use tools/bench's syntax (YAML values; dotted keys reach nested blocks, e.g.
`--set optimizer.params.lr=3e-4`); `--set` applies to every run, `--variant` adds a variant compared with
the first reference (`resume_at=K` makes it a resume, `reference=NAME` picks another reference).
`--only`/`--skip` select variants by name. `--reuse` keeps the finished runs of an earlier call with the
same --out whose configs are unchanged (add a variant without training the rest again).
The suite file format: tools/convergence_suite/suite.py; how to read a report: docs/CONVERGENCE.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for _path in (REPO_ROOT, HERE, os.path.join(HERE, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_config import parse_set  # noqa: E402  (tools/bench's --set / --variant syntax)
from bench_throughput import parse_variants  # noqa: E402
from convergence_suite.plot import plot_loss_curves  # noqa: E402
from convergence_suite.report import build_entry, exit_code, render_markdown, write_results_json  # noqa: E402
from convergence_suite.runner import Runner, part_configs  # noqa: E402
from convergence_suite.suite import SuiteError, load_suite  # noqa: E402
from megatron.neox_args import NeoXArgs  # noqa: E402
from megatron.neox_args.errors import ConfigError, format_error  # noqa: E402

USAGE_ERROR = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("suite", help="suite file, e.g. configs/convergence/cpu-tiny.yml")
    parser.add_argument("--out", required=True, help="directory for loss_curves.png, report.md, results.json, runs/")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar='"NAME: KEY=VALUE ..."',
                        help="one more variant (repeatable), compared with the first reference")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config key for every run (repeatable), after the suite's own `set`")
    parser.add_argument("--only", action="append", default=[], metavar="NAMES",
                        help="run only these variants (comma-separated, repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAMES",
                        help="leave these variants out (comma-separated, repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per launch before it is killed")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier call (same configs)")
    return parser.parse_args(argv)


def _names(items):
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def validate_configs(suite, runner) -> None:
    """Every launch's config through the config loader (as deepy.py will), before anything runs."""
    for run in suite.runs():
        for part, config in part_configs(suite, run, runner.run_dir(run)):
            source = f"{suite.path} run {run.name}" + (f" ({part})" if part else "")
            try:
                NeoXArgs.from_dict(config, source=source)
            except ConfigError as err:
                hint = "" if run.is_reference else f"\nFix the suite, or leave the variant out with --skip {run.name}."
                raise SuiteError(f"the config of run {run.name} is not valid:\n{format_error(err)}{hint}") from None


def main(argv=None) -> int:
    opts = parse_args(argv)
    suite_path, out_dir = os.path.abspath(opts.suite), os.path.abspath(opts.out)
    os.chdir(REPO_ROOT)  # config paths (data, tokenizer) are relative to the repository, as for deepy.py

    def progress(line: str) -> None:
        print(f"[convergence] {line}", flush=True)

    try:
        cli_set = parse_set(opts.overrides)
        cli_variants = parse_variants(opts.variants) if opts.variants else []
        suite = load_suite(suite_path, REPO_ROOT, cli_set, cli_variants, _names(opts.only), _names(opts.skip))
        runner = Runner(out_dir, REPO_ROOT, progress, opts.timeout, opts.reuse)
        validate_configs(suite, runner)
    except (SuiteError, ValueError) as err:
        message = format_error(err) if isinstance(err, ConfigError) else str(err)
        print(f"convergence.py: error: {message}", file=sys.stderr)
        return USAGE_ERROR

    os.makedirs(out_dir, exist_ok=True)
    runs = suite.runs()
    header = {
        "suite": suite.name, "suite_path": os.path.relpath(suite_path, REPO_ROOT),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(), "command": " ".join([os.path.basename(sys.executable), "tools/convergence.py"]
                                                   + (sys.argv[1:] if argv is None else list(argv))),
        "tolerance": {"train_loss": suite.tolerance.train_loss, "valid_loss": suite.tolerance.valid_loss,
                      "window": suite.tolerance.window},
    }
    progress(f"suite {suite.name}: {len(suite.references)} reference(s), {len(suite.variants)} variant(s) -> {out_dir}")
    entries, by_name = [], {}
    for index, run in enumerate(runs, start=1):
        result = runner.execute(suite, run, f"[{index}/{len(runs)}]")
        entry = build_entry(run, result, None if run.is_reference else by_name.get(run.reference))
        entries.append(entry)
        by_name[run.name] = entry
        if not run.is_reference:
            progress(f"{run.name} vs {run.reference}: {entry['status']}"
                     + (f" ({'; '.join(entry['reasons'])})" if entry["reasons"] else ""))
        write_outputs(out_dir, suite.name, header, entries, pending=len(runs) - index)
    code = exit_code(entries)
    print(open(os.path.join(out_dir, "report.md")).read())
    progress(f"{'PASS' if code == 0 else 'FAIL'}: report in {os.path.join(out_dir, 'report.md')}")
    return code


def write_outputs(out_dir: str, suite_name: str, header: dict, entries: list, pending: int) -> None:
    """loss_curves.png, report.md and results.json of the runs so far (`pending` still to run)."""
    header = dict(header, exit_code=exit_code(entries), pending=pending)
    subtitle = f"{header['date']}, commit {header['commit']}" + (f", {pending} run(s) pending" if pending else "")
    plot_loss_curves(os.path.join(out_dir, "loss_curves.png"), suite_name, entries, subtitle)
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write(render_markdown(header, entries))
    write_results_json(os.path.join(out_dir, "results.json"), header, entries)


if __name__ == "__main__":
    sys.exit(main())
