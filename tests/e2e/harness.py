"""Run `python deepy.py train.py <config>` for real (DeepSpeed launcher, gloo on CPU) and read its metrics.

Every end-to-end test starts from `SMALL_MODEL`, a ~0.1M-parameter model on the bundled corpus, and
changes only what it tests. Runs log every iteration so that losses can be compared step by step.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import yaml

from tests.helpers.distributed import find_free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL_MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "pos_emb": "rotary",
    "norm": "layernorm",
    "activation": "gelu",
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "make_vocab_size_divisible_by": 64,
    "optimizer": {"type": "AdamW", "params": {"lr": 3.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "weight_decay": 0.01,
    "lr_decay_style": "cosine",
    "lr_decay_iters": 40,
    "warmup": 0.1,
    "min_lr": 3.0e-4,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "train_iters": 10,
    "gradient_clipping": 1.0,
    "seed": 1234,
    "eval_interval": 1000,
    "eval_iters": 1,
    "data_path": "data/bundled/pystdlib_text_document",
    "tokenizer_type": "ByteLevelTokenizer",
    "num_workers": 0,
    "log_interval": 1,
    "num_gpus": 1,
    "zero_optimization": {"stage": 0},
}


def write_config(tmp_path, name: str, overrides: dict, base: dict = SMALL_MODEL) -> tuple[str, dict]:
    """`base` + overrides as `<tmp_path>/<name>.yml` (own log_dir and a free port); returns (path, config)."""
    config = dict(base)
    config.update(overrides)
    config["log_dir"] = overrides.get("log_dir", str(tmp_path / f"run_{name}"))
    config["master_port"] = find_free_port()
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path), config


def deepy_command(config_path: str) -> dict:
    """Keyword arguments of subprocess.run/Popen that launch deepy.py train.py on `config_path`."""
    return {"args": [sys.executable, "deepy.py", "train.py", config_path], "cwd": REPO_ROOT,
            "env": dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")}


def run_deepy(tmp_path, name: str, overrides: dict, timeout: int = 600, base: dict = SMALL_MODEL) -> list[dict]:
    """Train with `base` (SMALL_MODEL) + overrides; return the train records of metrics.jsonl."""
    path, config = write_config(tmp_path, name, overrides, base)
    proc = subprocess.run(**deepy_command(path), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"deepy.py failed ({proc.returncode}) for {name}:\n{output}"
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{config['master_port']}_*")
    assert not leaked, f"the run left DeepSpeed's CPU all-reduce segments in /dev/shm: {leaked}"
    return read_metrics(config["log_dir"], "train")


def load_config_file(path: str) -> dict:
    """A shipped config as a flat dict (to run it with a few keys replaced)."""
    with open(os.path.join(REPO_ROOT, path)) as handle:
        return {key.replace("-", "_"): value for key, value in yaml.safe_load(handle).items()}


def read_metrics(log_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [record for record in records if record["type"] == kind]


def losses(records: list[dict]) -> dict[int, float]:
    return {record["iteration"]: record["loss"] for record in records}
