"""deepy.py's checks before any worker starts (issue 13 item 5): DeepSpeed's own config class, fp16 on a
CPU, bad save/load/log_dir paths, a busy or taken save directory, and the master port."""

import socket

import pytest

from megatron.checkpointing.lock import SaveDirLock
from megatron.launcher.preflight import (
    check_deepspeed_config,
    check_paths,
    check_precision_device,
    choose_master_port,
)
from megatron.neox_args import ConfigError, NeoXArgs

BASE = {"data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "num_gpus": 2, "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer"}


def yaml_args(tmp_path, text: str) -> NeoXArgs:
    path = tmp_path / "run.yml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in BASE.items()) + text)
    return NeoXArgs.from_ymls([str(path)])


@pytest.mark.parametrize("text, key, suggestion", [
    ("zero_optimization: {stage: 1, stag: 1}\n", "zero_optimization.stag", "stage"),
    ("bf16: {enabeld: true}\n", "bf16.enabeld", "enabled"),
    ("zero_optimization: {stage: 2, offload_optimizer: {devic: cpu}}\n", "zero_optimization.offload_optimizer.devic",
     "device"),
])
def test_deepspeed_blocks_are_checked_by_deepspeeds_config_class(tmp_path, text, key, suggestion):
    args = yaml_args(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        check_deepspeed_config(args)
    message = str(info.value)
    assert key in message and f"did you mean `{suggestion}`" in message and "run.yml" in message


def test_a_valid_deepspeed_config_passes_at_any_data_parallel_size(tmp_path):
    check_deepspeed_config(yaml_args(tmp_path, "zero_optimization: {stage: 1}\nbf16: {enabled: true}\n"))


def test_fp16_on_a_cpu_is_a_config_error(tmp_path):
    args = yaml_args(tmp_path, "fp16: {enabled: true}\n")
    with pytest.raises(ConfigError, match="fp16.*needs a GPU.*run.yml"):
        check_precision_device(args, cuda_available=False)
    check_precision_device(args, cuda_available=True)
    bf16 = yaml_args(tmp_path, "bf16: {enabled: true}\n")
    check_precision_device(bf16, cuda_available=False)
    with pytest.raises(ConfigError, match="this GPU has no bf16 support"):
        check_precision_device(bf16, cuda_available=True, bf16_supported=lambda: False)


def test_save_log_dir_tensorboard_dir_paths(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for key in ("save", "log_dir", "tensorboard_dir"):
        with pytest.raises(ConfigError, match=f"{key}: .* is a file, not a directory"):
            check_paths(yaml_args(tmp_path, f"{key}: {a_file}\n"))
        with pytest.raises(ConfigError, match=f"{key}: .* cannot be created: .* is a file"):
            check_paths(yaml_args(tmp_path, f"{key}: {a_file / 'sub'}\n"))
    check_paths(yaml_args(tmp_path, f"save: {tmp_path / 'new' / 'ckpt'}\nlog_dir: {tmp_path / 'logs'}\n"))


def test_a_mistyped_load_is_an_error_but_load_equal_to_save_starts_fresh(tmp_path):
    with pytest.raises(ConfigError, match="load: .*ckpt_typo.* holds no checkpoint .*mistyped"):
        check_paths(yaml_args(tmp_path, f"load: {tmp_path / 'ckpt_typo'}\nsave: {tmp_path / 'ckpt'}\n"))
    check_paths(yaml_args(tmp_path, f"load: {tmp_path / 'ckpt'}\nsave: {tmp_path / 'ckpt'}\n"))


def test_a_save_dir_in_use_or_holding_checkpoints(tmp_path):
    save = tmp_path / "ckpt"
    with SaveDirLock(str(save)):
        with pytest.raises(ConfigError, match="is in use by another run"):
            check_paths(yaml_args(tmp_path, f"save: {save}\nload: {save}\n"))
    (save / "global_step200").mkdir()
    (save / "global_step200" / "complete").write_text("200\n")
    (save / "latest").write_text("global_step200")
    with pytest.raises(ConfigError, match="already holds checkpoints .*global_step200.*run.yml"):
        check_paths(yaml_args(tmp_path, f"save: {save}\n"))  # the README command run twice
    check_paths(yaml_args(tmp_path, f"save: {save}\nload: {save}\n"))
    check_paths(yaml_args(tmp_path, f"save: {save}\noverwrite_checkpoints: true\n"))


def test_busy_default_port_is_replaced_and_a_busy_user_port_is_an_error(tmp_path, monkeypatch):
    """Today: 70 s, then a 30-line EADDRINUSE traceback from the workers."""
    import megatron.launcher.preflight as preflight

    with socket.socket() as sock:
        sock.bind(("", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        user = yaml_args(tmp_path, f"master_port: {busy}\n")
        with pytest.raises(ConfigError, match=f"master_port: {busy} is in use .*run.yml"):
            choose_master_port(user)
        monkeypatch.setattr(preflight, "DEFAULT_MASTER_PORT", busy)  # the default port, taken
        default = yaml_args(tmp_path, "")
        default.launcher.master_port = busy
        note = choose_master_port(default)
        assert f"default master_port {busy} is in use" in note and default.launcher.master_port != busy
        assert preflight.port_is_free(default.launcher.master_port)
