"""A training job killed with SIGKILL and restarted ends exactly where an uninterrupted one does.

Both runs are real subprocesses of ``resume_job.py`` (a Flax NNX MLP trained through the
shared loop with checkpoints every 10 steps). The interrupted run is killed once a
checkpoint of step >= 20 is committed and before it finishes; the restarted run must
resume from a checkpoint (not from scratch) and reach the same parameters, optimiser
state and PRNG key as the uninterrupted run.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from rlhf_jax.train.metrics import read_jsonl

JOB = pathlib.Path(__file__).with_name("resume_job.py")
ROOT = JOB.parents[2]
NUM_STEPS = 60
CHECKPOINT_EVERY = 10


def _launch(workdir, seconds_per_step):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [
            sys.executable,
            str(JOB),
            f"--config={JOB}",
            f"--workdir={workdir}",
            f"--config.num_steps={NUM_STEPS}",
            f"--config.checkpoint_every={CHECKPOINT_EVERY}",
            f"--config.seconds_per_step={seconds_per_step}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _committed_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _summary(process):
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stdout
    return json.loads(stdout.strip().splitlines()[-1])


def test_killed_and_restarted_run_matches_uninterrupted_run(tmp_path):
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = _launch(reference_dir, 0.0)
    # Paced at 50 ms per step so the kill lands mid-training.
    victim = _launch(interrupted_dir, 0.05)
    deadline = time.monotonic() + 90
    while not any(s >= 2 * CHECKPOINT_EVERY for s in _committed_steps(interrupted_dir)):
        assert victim.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint committed in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (interrupted_dir / "final_params.npz").exists()
    assert max(_committed_steps(interrupted_dir)) < NUM_STEPS

    restarted = _summary(_launch(interrupted_dir, 0.0))
    reference_summary = _summary(reference)
    assert restarted["resumed"] and 2 * CHECKPOINT_EVERY <= restarted["start_step"] < NUM_STEPS
    assert not reference_summary["resumed"] and reference_summary["start_step"] == 0
    assert restarted["final_step"] == reference_summary["final_step"] == NUM_STEPS

    expected = np.load(reference_dir / "final_params.npz")
    actual = np.load(interrupted_dir / "final_params.npz")
    assert sorted(actual.files) == sorted(expected.files)
    assert any("params" in name for name in expected.files)
    assert any("opt_state" in name for name in expected.files)
    for name in expected.files:
        # Same compiled program, same inputs, same machine: XLA on CPU is deterministic,
        # so the runs agree bit for bit (no tolerance).
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)

    # The resumed run's metric log holds every step exactly once.
    records = read_jsonl(interrupted_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
