import pathlib
import shutil
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import vpl  # noqa: E402
from experiments.configs import vpl as vpl_config  # noqa: E402
from tests.experiments.conftest import shrink  # noqa: E402

N, L = 12, 5


def numbered_pairs():
    """Pairs whose chosen row i holds token i and rejected row i token 100 + i."""
    rows = np.arange(N)[:, None] * np.ones((1, L), np.int32)
    pairs = {"chosen_input_ids": rows, "rejected_input_ids": rows + 100}
    for side in ("chosen", "rejected"):
        pairs[f"{side}_attention_mask"] = np.ones((N, L), bool)
    pairs["chosen_reward"] = np.arange(N, dtype=np.float32) + 1.0
    pairs["rejected_reward"] = np.zeros(N, np.float32)
    return pairs


def test_group_b_users_see_every_pair_with_the_opposite_label():
    users = vpl.draw_users(numbered_pairs(), num_users=6, num_context=2, num_query=3, seed=0)
    np.testing.assert_array_equal(users["group"], [0, 1, 0, 1, 0, 1])
    for u, group in enumerate(users["group"]):
        ids = []
        for name in ("context", "query"):
            chosen = users[f"{name}_chosen_input_ids"][u, :, 0]
            rejected = users[f"{name}_rejected_input_ids"][u, :, 0]
            # Group a keeps the task's label (chosen < 100), group b the exact opposite.
            assert np.all((chosen < 100) == (group == 0))
            np.testing.assert_array_equal(np.abs(chosen - rejected), 100)
            gold = users[f"{name}_chosen_reward"][u] - users[f"{name}_rejected_reward"][u]
            assert np.all((gold > 0) == (group == 0))
            ids += list(np.minimum(chosen, rejected))
        assert len(set(ids)) == 5  # a user's K + Q pairs are distinct


def test_swapped_context_carries_the_other_groups_labels_and_keeps_the_queries():
    users = vpl.draw_users(numbered_pairs(), num_users=4, num_context=2, num_query=3, seed=1)
    swapped = vpl.swap_context(users)
    np.testing.assert_array_equal(swapped["context_group"], 1 - users["group"])
    np.testing.assert_array_equal(
        swapped["context_chosen_input_ids"], users["context_rejected_input_ids"]
    )
    for key in users:
        if key.startswith("query_") or key == "group":
            np.testing.assert_array_equal(swapped[key], users[key])


@pytest.fixture(scope="module")
def tiny_run(tiny_sft_and_rm, tmp_path_factory):
    policy, scorer = tiny_sft_and_rm
    config = shrink(vpl_config.get_config("tiny"), 12, 3e-3)
    config.init_from = policy
    config.trunk_from = scorer  # the VPL trunk starts from a Bradley–Terry model of group a
    config.batch_size = 4
    config.bt_num_steps = 12
    config.users.update(num_train=64, num_heldout=32, num_context=2, num_query=2)
    workdir = tmp_path_factory.mktemp("vpl")
    return workdir, vpl.run(config, str(workdir))


def test_tiny_preset_trains_both_models_and_exports_them(tiny_run):
    workdir, summary = tiny_run
    assert summary["steps"] == 12
    assert summary["trunk"] == "trunk_from"
    assert (workdir / "vpl" / "vpl").exists() and (workdir / "bt" / "scorer").exists()
    for key in ("vpl_heldout_accuracy", "vpl_swapped_context_accuracy", "bt_heldout_accuracy"):
        assert 0.0 <= summary[f"{key}_a"] <= 1.0 and 0.0 <= summary[f"{key}_b"] <= 1.0
    assert summary["vpl_heldout_kl"] >= 0.0


def test_pooled_bradley_terry_cannot_serve_both_opposed_groups(tiny_run):
    _, summary = tiny_run
    # 16 users of each group with 2 query pairs: 32 pairs per group, one standard error
    # of a chance-level accuracy is 0.09. Both groups are labelled in exactly opposite
    # ways, so a single reward right on one group's pairs is wrong on the other's: the
    # worse group stays within three standard errors of 0.5 (a model of one group alone
    # would sit near its accuracy on one and near one minus it on the other).
    assert min(summary["bt_heldout_accuracy_a"], summary["bt_heldout_accuracy_b"]) < 0.5 + 0.27
    assert summary["bt_heldout_accuracy_a"] + summary["bt_heldout_accuracy_b"] < 1.0 + 0.27


def test_a_frozen_trunk_run_embeds_once_and_trains_only_the_heads(
    tiny_run, tiny_sft_and_rm, tmp_path
):
    policy, scorer = tiny_sft_and_rm
    config = shrink(vpl_config.get_config("tiny"), 12, 3e-3)
    config.init_from, config.trunk_from = policy, scorer
    config.freeze_trunk, config.vpl.free_bits = True, 1.0
    config.batch_size, config.bt_num_steps = 4, 12
    config.users.update(num_train=64, num_heldout=32, num_context=2, num_query=2)
    shutil.copytree(tiny_run[0] / "bt", tmp_path / "bt")  # the finished baseline resumes as is
    summary = vpl.run(config, str(tmp_path))
    assert summary["freeze_trunk"] is True and summary["steps"] == 12
    assert summary["bt_heldout_accuracy_a"] == tiny_run[1]["bt_heldout_accuracy_a"]
    for key in ("vpl_heldout_accuracy", "vpl_swapped_context_accuracy"):
        assert 0.0 <= summary[f"{key}_a"] <= 1.0 and 0.0 <= summary[f"{key}_b"] <= 1.0
    assert (tmp_path / "vpl" / "vpl").exists()
