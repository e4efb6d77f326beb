"""Metric files are written, parseable, fetched in batches and de-duplicated on resume."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train.metrics import MetricsWriter, read_event_scalars, read_jsonl


def step_metrics(step):
    return {
        "loss": jnp.float32(1.0 / step),
        "grad_norm": jnp.float32(step * 0.25),
        "nonfinite": jnp.bool_(step == 3),
    }


def test_jsonl_and_tensorboard_hold_every_step(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=5, progress=False)
    for step in range(1, 6):
        writer.record(step, step_metrics(step))
    writer.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        # float32 values round-tripped through Python floats: exact to float32 precision.
        np.testing.assert_allclose(r["loss"], 1.0 / r["step"], rtol=1e-7)
        assert r["nonfinite"] is (r["step"] == 3)
    scalars = read_event_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [v for _, v in scalars["loss"]], [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], rtol=1e-7
    )
    np.testing.assert_allclose([v for _, v in scalars["grad_norm"]], [0.25, 0.5, 0.75, 1.0, 1.25])


def test_device_values_are_fetched_once_per_flush(tmp_path, monkeypatch):
    calls = []
    real_device_get = jax.device_get
    monkeypatch.setattr(
        metrics_lib.jax, "device_get", lambda x: calls.append(1) or real_device_get(x)
    )
    writer = MetricsWriter(tmp_path, total_steps=8, progress=False)
    for step in range(1, 5):
        writer.record(step, step_metrics(step))
    assert calls == []  # recording never reads the device
    assert [r["step"] for r in writer.flush()] == [1, 2, 3, 4]
    assert len(calls) == 1  # four steps, one transfer
    assert writer.flush() == []
    writer.close()


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    first = MetricsWriter(tmp_path, total_steps=6, progress=False)
    for step in range(1, 6):
        first.record(step, {"loss": jnp.float32(step)})
    first.close()  # the interrupted run logged steps 1..5; its checkpoint was step 3
    resumed = MetricsWriter(tmp_path, total_steps=6, start_step=3, progress=False)
    resumed.record(4, {"loss": jnp.float32(40.0)})
    resumed.close()  # stopped again after step 4: the old step 5 must not survive
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == expected
    assert read_event_scalars(tmp_path / "tensorboard")["loss"] == expected
