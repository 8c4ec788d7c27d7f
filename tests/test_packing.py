"""Joint packing over text and ViT tokens (`data.packing`), property tests on random draws: every item placed
exactly once or reported too large, neither capacity exceeded in any row; rows dealt to ranks with equal
counts, every row once; on lognormal text lengths and ViT token counts the ranks' loads are within 1.10 of
the mean in both dimensions, where balancing on text alone leaves the ViT side uneven."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glm5v_jax.data.packing import balance_ranks, imbalance, pack_rows, row_loads


def _draw(seed: int, n: int, seq_len: int):
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(np.log(seq_len / 6), 0.8, n).astype(int), 1, seq_len + 50)
    vit = (rng.poisson(1.5, n) * rng.lognormal(np.log(700), 0.6, n)).astype(int)
    return text, vit


@pytest.mark.parametrize("seed", range(6))
def test_every_item_is_placed_once_within_both_capacities(seed):
    seq_len, cap = 512, 2048
    text, vit = _draw(seed, 300, seq_len)
    rows, skipped = pack_rows(text, vit, seq_len=seq_len, vit_capacity=cap)
    placed = [i for r in rows for i in r]
    assert sorted(placed + skipped) == list(range(len(text)))  # once each
    assert all((text[i] > seq_len) or (vit[i] > cap) for i in skipped)
    loads = row_loads(rows, text, vit)
    assert (loads[:, 0] <= seq_len).all() and (loads[:, 1] <= cap).all()
    assert all(r for r in rows)  # no empty row


@pytest.mark.parametrize("num_ranks", [1, 3, 8, 32])
def test_ranks_get_equal_row_counts_and_every_row_once(num_ranks):
    text, vit = _draw(num_ranks, 700, 1024)
    rows, _ = pack_rows(text, vit, seq_len=1024, vit_capacity=4096)
    ranks = balance_ranks(row_loads(rows, text, vit), num_ranks)
    assert len(ranks) == num_ranks and len({len(r) for r in ranks}) == 1
    flat = sorted(i for r in ranks for i in r)
    assert flat == list(range(len(flat))) and len(flat) >= len(rows) > len(flat) - num_ranks  # padding rows last


@pytest.mark.parametrize("seed", range(3))
def test_lognormal_loads_balance_in_both_dimensions(seed):
    text, vit = _draw(100 + seed, 3000, 4096)
    rows, _ = pack_rows(text, vit, seq_len=4096, vit_capacity=8192)
    loads = row_loads(rows, text, vit)
    for num_ranks in (8, 16):
        joint = imbalance(balance_ranks(loads, num_ranks), loads)
        text_only = imbalance(balance_ranks(loads[:, :1], num_ranks), loads)
        assert (joint <= 1.10).all(), (num_ranks, joint)
        assert text_only[1] > joint[1]  # balancing text length alone leaves the ViT side less even


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one length"):
        pack_rows([1, 2], [1], seq_len=8, vit_capacity=8)
    with pytest.raises(ValueError, match="num_ranks"):
        balance_ranks(np.ones((3, 2)), 0)


@pytest.mark.parametrize("shape, shards", [((1, 1, 1, 1), 1), ((2, 4, 1, 1), 8), ((2, 2, 2, 1), 4), ((1, 2, 4, 1), 2)])
def test_the_rows_are_balanced_over_the_meshs_batch_shards(shape, shards):
    """`local_row_shards`: what joint packing balances over by default (`data.packing_ranks=0`) is the number
    of slices the batch sharding cuts the host's rows into: the data and fsdp axes, not tensor or expert."""
    import jax

    from glm5v_jax.config_args import config_file
    from glm5v_jax.train.parallel import batch_sharding, local_row_shards, plan_from_config

    mesh_cfg = config_file(Path(__file__).parents[1] / "configs" / "vlm_pretrain.py", "tiny").mesh
    mesh_cfg.shape = shape
    n = int(np.prod(shape))
    plan = plan_from_config(mesh_cfg, jax.devices()[:n])
    assert local_row_shards(batch_sharding((16, 64), plan), 16, 64) == shards


def test_packing_balance_experiment_small(tmp_path):
    """experiments/packing_balance.py on 600 samples: the three modes per rank count, joint the most even on
    the ViT side, the rows of both-capacity packing within the ViT capacity, the report and files written."""
    from helpers import experiment_module

    bench = experiment_module("packing_balance")
    r = bench.main(["--samples=600", "--ranks=4,8", f"--out_dir={tmp_path}"], log=lambda line: None)
    by = {(row["ranks"], row["mode"]): row for row in r["rows"]}
    for ranks in (4, 8):
        joint, text_only = by[ranks, "joint"], by[ranks, "text-only"]
        assert joint["vit_max_over_mean"] <= 1.10 < text_only["vit_max_over_mean"]
        assert joint["max_vit_per_row"] <= 8192 < text_only["max_vit_per_row"]
    assert [Path(f).name for f in r["files"]] == ["packing_balance.md", "packing_balance.json"]
    assert "| 8 | joint |" in Path(r["files"][0]).read_text()
