"""Config validation names the key, the value and the expectation; the flags entry point."""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from rlhf_jax.train.config import ConfigError, Field, validate_config

HERE = pathlib.Path(__file__).parent

SCHEMA = {
    "learning_rate": Field(float, minimum=0.0, maximum=1.0),
    "num_steps": Field(int, minimum=1),
    "loss": Field(str, choices=("dpo", "ipo")),
    "seed": Field(int, required=False),
    "warmup": Field(int, allow_none=True),
    "optimizer": {"name": Field(str), "b1": Field(float, minimum=0.0, maximum=1.0)},
}


def good_config():
    return ml_collections.ConfigDict(
        {
            "learning_rate": 1e-3,
            "num_steps": 10,
            "loss": "dpo",
            "warmup": None,
            "optimizer": {"name": "adam", "b1": 0.9},
        }
    )


def test_valid_config_passes_and_float_accepts_int():
    validate_config(good_config(), SCHEMA)
    config = good_config()
    config.learning_rate = 1  # an int where a float is expected is fine
    validate_config(config, SCHEMA)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "learning_rate",
            2.0,
            r"config\.learning_rate: got 2\.0 \(float\); expected .*in \[0\.0, 1\.0\]",
        ),
        ("num_steps", 0, r"config\.num_steps: got 0 \(int\); expected .*in \[1, inf\]"),
        ("num_steps", True, r"config\.num_steps: got True \(bool\); expected a value of type int"),
        ("num_steps", 2.5, r"config\.num_steps: got 2\.5 \(float\); expected a value of type int"),
        ("loss", "ppo", r"config\.loss: got 'ppo' \(str\); expected .* among \['dpo', 'ipo'\]"),
        ("optimizer.b1", -0.1, r"config\.optimizer\.b1: got -0\.1 \(float\)"),
        ("optimizer", 3, r"config\.optimizer: got 3; expected a nested config"),
    ],
)
def test_wrong_values_name_key_value_and_expectation(path, value, message):
    config = good_config().to_dict()
    *parents, leaf = path.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, SCHEMA)


def test_unknown_and_missing_keys_are_all_reported():
    config = good_config()
    config.unlock()
    config.learning_rte = 0.1  # a typo
    config.optimizer.bogus = 1
    del config["num_steps"]
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    text = str(error.value)
    assert "config.learning_rte: unknown key" in text
    assert "did you mean config.learning_rate?" in text
    assert "config.optimizer.bogus: unknown key" in text
    assert "config.num_steps: missing; expected a value of type int" in text
    assert "config.seed" not in text  # optional keys may be absent


def _run_entry_point(tmp_path, config_body, *overrides):
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({config_body})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    command = [sys.executable, str(HERE / "config_main.py"), f"--config={config_file}"]
    command += [f"--workdir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_entry_point_reads_config_file_overrides_and_workdir(tmp_path):
    result = _run_entry_point(
        tmp_path,
        "{'learning_rate': 0.1, 'optimizer': {'name': 'sgd'}}",
        "--config.learning_rate=0.5",
    )
    assert result.returncode == 0, result.stderr
    received = json.loads(result.stdout.strip().splitlines()[-1])
    assert received == {
        "config": {"learning_rate": 0.5, "optimizer": {"name": "sgd"}},
        "workdir": str(tmp_path / "run"),
    }


def test_entry_point_rejects_a_typo_naming_the_key(tmp_path):
    result = _run_entry_point(
        tmp_path, "{'learning_rate': 0.1, 'optimizer': {'name': 'sgd', 'b2': 0.9}}"
    )
    assert result.returncode != 0
    assert "config.optimizer.b2: unknown key" in result.stderr
