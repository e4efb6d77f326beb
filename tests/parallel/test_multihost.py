import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import parallel_real_steps as real
import parallel_tiny_lm as tiny
import pytest

from rlhf_jax.parallel import multihost
from rlhf_jax.parallel.mesh import make_mesh

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_single_process_needs_no_settings():
    assert multihost.distributed_settings(None, environ={}) is None
    assert multihost.distributed_settings({"num_processes": 1}, environ={}) is None
    assert multihost.initialize_from_env(None, environ={}) is None
    assert not jax.distributed.is_initialized()


def test_settings_from_environment():
    environ = {
        "RLHF_JAX_COORDINATOR": "10.0.0.1:1234",
        "RLHF_JAX_NUM_PROCESSES": "4",
        "RLHF_JAX_PROCESS_ID": "3",
        "RLHF_JAX_LOCAL_DEVICE_IDS": "0,1",
    }
    assert multihost.distributed_settings(None, environ) == multihost.DistributedSettings(
        "10.0.0.1:1234", 4, 3, (0, 1)
    )


def test_config_overrides_environment_and_jax_variables_are_read():
    environ = {
        "JAX_COORDINATOR_ADDRESS": "jax-host:99",
        "RLHF_JAX_NUM_PROCESSES": "4",
        "RLHF_JAX_PROCESS_ID": "3",
    }
    config = ml_collections.ConfigDict({"num_processes": 2, "process_id": 0})
    settings = multihost.distributed_settings(config, environ)
    assert settings == multihost.DistributedSettings("jax-host:99", 2, 0, None)


def test_auto_detect_defers_to_jax():
    settings = multihost.distributed_settings(None, {"RLHF_JAX_AUTO_DETECT": "1"})
    assert settings == multihost.DistributedSettings(None, None, None, auto_detect=True)
    # The config wins over the environment: auto_detect=False means a single process here.
    assert (
        multihost.distributed_settings({"auto_detect": False}, {"RLHF_JAX_AUTO_DETECT": "1"})
        is None
    )


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RLHF_JAX_NUM_PROCESSES": "2", "RLHF_JAX_PROCESS_ID": "0"}, "RLHF_JAX_COORDINATOR"),
        (
            {"RLHF_JAX_COORDINATOR": "h:1", "RLHF_JAX_NUM_PROCESSES": "2"},
            "RLHF_JAX_PROCESS_ID",
        ),
        (
            {
                "RLHF_JAX_COORDINATOR": "h:1",
                "RLHF_JAX_NUM_PROCESSES": "2",
                "RLHF_JAX_PROCESS_ID": "2",
            },
            "[0, 2)",
        ),
        ({"RLHF_JAX_NUM_PROCESSES": "two"}, "num_processes"),
    ],
)
def test_incomplete_settings_name_what_is_missing(environ, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(")", r"\)")):
        multihost.distributed_settings(None, environ)


def test_single_process_feeds_every_row():
    mesh = make_mesh((2, 2, 2))
    assert multihost.process_rows(8, mesh) == slice(0, 8)
    tokens = tiny.make_tokens(1)[0]
    global_tokens = multihost.make_global_array(multihost.local_rows(tokens, mesh), mesh)
    assert global_tokens.shape == tokens.shape
    np.testing.assert_array_equal(np.asarray(global_tokens), tokens)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_run_the_sft_step_like_one_process_with_eight_devices(tmp_path):
    port = _free_port()
    output = tmp_path / "result.json"
    procs = []
    for process_id in range(2):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
            RLHF_JAX_COORDINATOR=f"127.0.0.1:{port}",
            RLHF_JAX_NUM_PROCESSES="2",
            RLHF_JAX_PROCESS_ID=str(process_id),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "parallel_multihost_worker.py"), str(output)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    result = json.loads(output.read_text())

    # Each process fed its own contiguous half of every global batch.
    assert result["rows"] == [[0, 4], [4, 8]]

    # Single-process reference: the same real SFT step, state and batches on this
    # process's 8 devices, same mesh shape.
    reference = real.compiled_step("sft", (2, 2, 2))
    state, losses = reference.initial_state(), []
    for index in range(len(result["losses"])):
        state, metrics = reference(state, real.sft_batch(index), real.step_key(index))
        losses.append(float(metrics["loss"]))
    # f32 with a different reduction order across processes (gloo all-reduce): a few ulps
    # per step over 3 SGD steps, far inside 1e-5 (relative for losses, absolute for the
    # parameters, which the steps move by up to ~0.1).
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    gathered = np.load(f"{output}.npz")
    expected = jax.tree.leaves(real.host(state.params))
    assert len(gathered.files) == len(expected)
    for index, want in enumerate(expected):
        np.testing.assert_allclose(gathered[f"arr_{index}"], want, rtol=0, atol=1e-5)
