"""Where a run reports its metrics: a console line, `<run_dir>/metrics.jsonl`, TensorBoard and W&B.

One `MetricsLogger` per process. Only the logging ranks (rank 0 unless told otherwise) write anything;
on the others every method is a no-op, so the trainer can call them unconditionally.

Console line (one per call of `log_train`, which the trainer makes every `log_interval` iterations):

    iter 120/1000 | loss 3.412 | lr 5.8e-04 | grad_norm 0.91 | tok/s 41.2k | TFLOP/s 112.5 | MFU 38.1% | causal MFU 31.0% | step 0.41s | ETA 6m02s

`MFU` counts FLOPs in the Megatron/PaLM convention (6N + 12 L h s per token: the full attention score
matrix), `causal MFU` counts causal attention as half the score matrix (6N + 6 L h s); metrics.jsonl has
both (`mfu`, `mfu_causal`, `tflops_per_device`, `tflops_per_device_causal`). See
`megatron.training.metrics.flops_per_token`.

Each logged step is also one JSON object on its own line of `metrics.jsonl` (`"type": "train"` or
`"type": "eval"` with the split's `"name"`), flushed at once so a crash loses nothing already reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Optional, TextIO

METRICS_FILE = "metrics.jsonl"


def format_count(value: float) -> str:
    """Short human count: 950 -> '950', 41200 -> '41.2k', 3.1e6 -> '3.10M', 2e9 -> '2.00G'."""
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            scaled = value / threshold
            return f"{scaled:.1f}{suffix}" if abs(scaled) >= 10 else f"{scaled:.2f}{suffix}"
    return f"{value:.0f}"


def format_duration(seconds: Optional[float]) -> str:
    """Short human duration: 0.41 -> '0.41s', 362 -> '6m02s', 7384 -> '2h03m', 2 days -> '2d00h'."""
    if seconds is None or math.isnan(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    whole = int(round(seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def format_number(value: float) -> str:
    """A metric value: 4 significant digits, scientific notation when tiny or huge (1.23e-05)."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def format_train_line(iteration: int, total_iters: Optional[int], values: dict) -> str:
    """The console line for one training log point, from the same values that go to metrics.jsonl."""
    progress = f"iter {iteration}/{total_iters}" if total_iters else f"iter {iteration}"
    parts = [progress]
    if values.get("loss") is not None:
        parts.append(f"loss {values['loss']:.3f}")
    if values.get("lr") is not None:
        parts.append(f"lr {values['lr']:.1e}")
    if values.get("grad_norm") is not None:
        parts.append(f"grad_norm {values['grad_norm']:.2f}")
    if values.get("tokens_per_s") is not None:
        parts.append(f"tok/s {format_count(values['tokens_per_s'])}")
        tflops = values["tflops_per_device"]
        parts.append(f"TFLOP/s {tflops:.1f}" if tflops >= 100 else f"TFLOP/s {tflops:.3g}")
        mfu = values.get("mfu")
        parts.append(f"MFU {mfu * 100:.1f}%" if mfu is not None else "MFU n/a")
        mfu_causal = values.get("mfu_causal")
        if mfu_causal is not None:
            parts.append(f"causal MFU {mfu_causal * 100:.1f}%")
        parts.append(f"step {format_duration(values['step_time_s'])}")
        parts.append(f"ETA {format_duration(values.get('eta_s'))}")
    known = {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "step_time_s", "eta_s",
             "elapsed_s", "tflops_per_device_causal", "mfu_causal"}
    for key, value in values.items():
        if key in known or isinstance(value, bool):
            continue
        if isinstance(value, int):
            parts.append(f"{key} {value}")
        elif isinstance(value, float):
            parts.append(f"{key} {format_number(value)}")
    return " | ".join(parts)


DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def _open_wandb(logging_args, run_dir: Optional[str], config: dict):
    """Start a W&B run; offline unless an API key (or an explicit WANDB_MODE) is set, so it never prompts."""
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError(
            "use_wandb is set but the wandb package is not installed: pip install wandb, "
            "or set use_wandb: false."
        ) from err
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    # wandb reads the server URL from WANDB_BASE_URL (GPT-NeoX's wandb_host); the default host leaves a URL
    # already in the environment alone
    if logging_args.wandb_host != DEFAULT_WANDB_HOST or "WANDB_BASE_URL" not in os.environ:
        os.environ["WANDB_BASE_URL"] = logging_args.wandb_host
    return wandb.init(
        project=logging_args.wandb_project,
        entity=logging_args.wandb_team,
        group=logging_args.wandb_group,
        name=os.path.basename(os.path.normpath(run_dir)) if run_dir else None,
        dir=run_dir,
        config=config,
        mode=mode,
    )


class MetricsLogger:
    """Writes training and evaluation metrics of one run to every configured sink.

    Args:
        logging_args: the `LoggingArgs` section (log_interval, tensorboard_dir, use_wandb, wandb_*).
        run_dir: the run directory (deepy.py sets it as `log_dir`); `metrics.jsonl` is written there.
            None writes no metrics.jsonl (console, TensorBoard and W&B only).
        rank: this process's global rank.
        neox_args_dict: `NeoXArgs.to_dict()`; W&B run config, TensorBoard text, and `train_iters` for the
            progress shown in the console line.
        log_ranks: ranks that write (default only rank 0).
        stream: where console lines go (default stdout).
    """

    def __init__(
        self,
        logging_args,
        run_dir: Optional[str],
        rank: int,
        neox_args_dict: Optional[dict] = None,
        *,
        log_ranks: Iterable[int] = (0,),
        stream: Optional[TextIO] = None,
    ):
        self.args = logging_args
        self.run_dir = run_dir
        self.rank = rank
        self.enabled = rank in set(log_ranks)
        self.total_iters = (neox_args_dict or {}).get("train_iters")
        self._stream = stream
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not self.enabled:
            return
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8")
        if logging_args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=logging_args.tensorboard_dir)
            if neox_args_dict:
                self._tensorboard.add_text("config", "```\n" + json.dumps(neox_args_dict, indent=2) + "\n```")
        if logging_args.use_wandb:
            self._wandb = _open_wandb(logging_args, run_dir, neox_args_dict or {})

    def should_log(self, iteration: int) -> bool:
        """True at the iterations where the trainer should call `log_train` (every `log_interval`)."""
        return iteration % self.args.log_interval == 0

    def log_train(
        self,
        iteration: int,
        values: Optional[Mapping[str, Any]] = None,
        *,
        loss: Optional[float] = None,
        lr: Optional[float] = None,
        grad_norm: Optional[float] = None,
        throughput: Optional[Mapping[str, Any]] = None,
        **extra: Any,
    ) -> None:
        """Report one training log point.

        Values come from `values` (a dict, e.g. the trainer's record already merged with a
        `ThroughputStats`), and/or the keyword arguments: `throughput` is a `ThroughputStats` from
        `megatron.training.metrics.ThroughputMeter`; `extra` holds any other scalars (loss_scale, ...).
        Standard fields (loss, lr, grad_norm, throughput) are shown first on the console, the rest after.
        None values are left out of the records.
        """
        if not self.enabled:
            return
        merged: dict = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        for source in (values, throughput):
            for key, value in (source or {}).items():
                if value is not None or merged.get(key) is None:
                    merged[key] = value
        merged.update(extra)
        merged.pop("iteration", None)
        merged = {key: _plain(value) for key, value in merged.items()}
        self._print(format_train_line(iteration, self.total_iters, merged))
        self._write_record("train", iteration, merged)

    def log_eval(self, iteration: int, loss: float, ppl: Optional[float] = None, name: str = "valid") -> None:
        """Report an evaluation on split `name`: mean loss and perplexity (exp(loss) when not given)."""
        if not self.enabled:
            return
        loss = _plain(loss)
        if ppl is None:
            ppl = math.exp(min(loss, 700.0))
        values = {"loss": loss, "ppl": _plain(ppl)}
        self._print(f"eval {name} iter {iteration} | loss {loss:.4f} | ppl {format_number(values['ppl'])}")
        self._write_record(name, iteration, values, kind="eval")

    def info(self, message: str) -> None:
        """Print a free-form message (checkpoint saved, ...) on the logging ranks."""
        if self.enabled:
            self._print(message)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _print(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        print(line, file=stream, flush=True)

    def _write_record(self, prefix: str, iteration: int, values: dict, kind: Optional[str] = None) -> None:
        """One metrics.jsonl line; scalars to TensorBoard and W&B under `<prefix>/<key>`."""
        present = {key: value for key, value in values.items() if value is not None}
        header = {"type": kind or prefix, "iteration": iteration}
        if kind is not None:
            header["name"] = prefix
        record = {**header, "time": time.time(), **present}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        scalars = {f"{prefix}/{key}": value for key, value in present.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, iteration)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)


def _plain(value):
    """A Python scalar from a 0-d tensor or numpy scalar (without importing either); others unchanged."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
