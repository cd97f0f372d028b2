"""diagnostics.py (per-epoch signs of a collapse) on hand-set architecture parameters,
early_stop.py's rules on hand-made per-epoch summaries, and metrics.py (metrics.csv,
TensorBoard when installed, faked here)."""
import csv
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from genotypes import ATTN_PRIMITIVES, PRIMITIVES, Genotype
from model_search import Network
from runtime.diagnostics import (attention_counts, changed_edges, describe, epoch_diagnostics,
                                 row_entropy, scalars)
from runtime.early_stop import EarlyStop
from runtime.errors import UserError
from runtime.metrics import Metrics, heatmap_image

CONCAT = [2, 3, 4, 5]


def _set(param: torch.Tensor, column: int, strength: float = 5.0) -> None:
    """Make candidate ``column`` the strongest of every row, edge e a little more than e-1
    (so each node keeps its last two edges)."""
    with torch.no_grad():
        param.zero_()
        for row in range(param.shape[0]):
            param[row, column] = strength + 0.01 * row


def test_row_entropy_is_one_when_uniform_and_zero_when_one_hot():
    rows = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],
                        dtype=torch.float64)
    # float64: the only error is rounding, a few units of 1e-16.
    assert row_entropy(rows).tolist() == pytest.approx([1.0, 0.0, 0.5], abs=1e-12)


def test_epoch_diagnostics_on_hand_set_alphas_and_betas():
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "after_every", image_size=16)
    params = network.named_arch_parameters()
    _set(params["alphas_normal"], PRIMITIVES.index("skip_connect"))
    _set(params["alphas_reduce"], PRIMITIVES.index("sep_conv_3x3"))
    with torch.no_grad():  # node 3 of the reduction cell: max pooling on its last two edges
        params["alphas_reduce"][12:14, PRIMITIVES.index("max_pool_3x3")] = 10.0
    _set(params["betas_normal"], ATTN_PRIMITIVES.index("CBAM"))
    with torch.no_grad():
        params["betas_reduce"].zero_()  # uniform: every edge keeps the first, Identity
    genotype = network.genotype()
    assert [op for op, _, _ in genotype.normal] == ["skip_connect"] * 8
    assert [op for op, _, _ in genotype.reduce] == ["sep_conv_3x3"] * 6 + ["max_pool_3x3"] * 2

    stats = epoch_diagnostics(network, genotype, genotype)

    assert stats["parameter_free"] == {"normal": 8, "reduce": 2}
    assert stats["skip_connect"] == {"normal": 8, "reduce": 0}
    assert stats["genotype_changed"] is False and stats["edges_changed"] == 0
    assert stats["attention"]["normal"] == {name: 8 * (name == "CBAM") for name in ATTN_PRIMITIVES}
    assert stats["attention"]["reduce"] == {name: 8 * (name == "Identity") for name in ATTN_PRIMITIVES}
    entropy = stats["entropy"]
    assert entropy["betas_reduce"] == pytest.approx({"mean": 1.0, "min": 1.0}, abs=1e-12)
    # One row of alphas_normal in float64: 5.0 + 0.01 * row on one of 8 columns.
    weights = torch.softmax(params["alphas_normal"].detach().double(), -1)
    expected = -(weights * weights.log()).sum(-1) / math.log(8)
    assert entropy["alphas_normal"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-12)
    assert entropy["alphas_normal"]["min"] == pytest.approx(float(expected.min()), abs=1e-12)
    assert entropy["alphas_normal"]["min"] < 0.2

    row = scalars(stats)
    assert row["parameter_free_normal"] == 8 and row["skip_connect_reduce"] == 0
    assert row["attention_normal_CBAM"] == 8 and row["genotype_changed"] == 0
    assert row["entropy_betas_reduce_min"] == pytest.approx(1.0, abs=1e-12)
    lines = describe(stats, "epoch 3")
    assert "normal 8/8 (8 skip_connect), reduce 2/8 (0 skip_connect)" in lines[0]
    assert "unchanged since epoch 3" in lines[0]
    assert "CBAM 8" in lines[2]


@pytest.mark.parametrize("location", ["end", "no_attention"])
def test_no_edge_attention_counted_where_edges_hold_operations_only(location):
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), location, image_size=16)
    stats = epoch_diagnostics(network, network.genotype(), network.genotype())
    assert stats["attention"] == {}
    assert len(describe(stats, "epoch 1")) == 2
    assert set(stats["entropy"]) == set(network.named_arch_parameters())


def test_attention_counted_as_operation_in_the_mixed_locations():
    edges = [("SE", 0, ""), ("sep_conv_3x3", 1, ""), ("CBAM", 0, "SE"), ("skip_connect", 2, "")]
    assert attention_counts(edges, ["SE", "BAM", "CBAM"]) == {"SE": 2, "BAM": 0, "CBAM": 1}


def test_changed_edges_ignores_the_order_of_a_node_s_two_edges():
    normal = [("sep_conv_3x3", 0, "SE"), ("skip_connect", 1, "CBAM")] * 4
    reduce = [("max_pool_3x3", 0, "BAM"), ("sep_conv_5x5", 1, "SE")] * 4
    before = Genotype(normal, CONCAT, reduce, CONCAT, "", "")
    swapped = Genotype([normal[1], normal[0]] + normal[2:], CONCAT, reduce, CONCAT, "", "")
    assert changed_edges(swapped, before) == 0
    one_op = Genotype(normal, CONCAT, [("avg_pool_3x3", 0, "BAM")] + reduce[1:], CONCAT, "", "")
    assert changed_edges(one_op, before) == 1
    attention_and_bottleneck = Genotype(normal[:7] + [("skip_connect", 1, "SE")], CONCAT, reduce,
                                        CONCAT, "SE", "")
    assert changed_edges(attention_and_bottleneck, before) == 2


# -- early stopping -------------------------------------------------------------------------

def _summaries(eigenvalues, skips=None):
    skips = skips or [0] * len(eigenvalues)
    return [{"epoch": epoch, "eigenvalue": value,
             "genotype": {"normal": [["skip_connect", 0, ""]] * k + [["sep_conv_3x3", 1, ""]] * (8 - k)}}
            for epoch, (value, k) in enumerate(zip(eigenvalues, skips), 1)]


@pytest.mark.parametrize("text", ["skip", "skip:", "skip:x", "skip:-1", "skip:1.5", "hess", "",
                                  "hessian:2"])
def test_bad_early_stop_values_are_one_line_user_errors(text):
    with pytest.raises(UserError, match="--early_stop") as error:
        EarlyStop.parse(text, 5, 10, 1.3)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("window, after, ratio", [(0, 10, 1.3), (5, -1, 1.3), (5, 10, 0.0)])
def test_bad_hessian_rule_parameters_are_user_errors(window, after, ratio):
    with pytest.raises(UserError, match="--early_stop_"):
        EarlyStop.parse("hessian", window, after, ratio)


def test_skip_rule_stops_at_n_skips_and_keeps_that_epoch():
    rule = EarlyStop.parse("skip:2", 5, 10, 1.3)
    summaries = _summaries([None] * 4, skips=[0, 1, 3, 0])
    decisions = [rule.check(summaries[:n]) for n in range(1, 5)]
    assert decisions[:2] == [None, None]
    assert (decisions[2].epoch, decisions[2].kept_epoch) == (3, 3)
    assert "3 skip_connect" in decisions[2].reason and "skip:2" in decisions[2].reason
    assert EarlyStop.parse("skip:0", 5, 10, 1.3).check(summaries[:1]).epoch == 1


def test_hessian_rule_compares_local_averages_and_keeps_the_start_of_the_window():
    rule = EarlyStop.parse("hessian", 2, 3, 1.3)
    # Windows of 2: epoch 5 compares (1 + 1.2)/2 with (1 + 1)/2: 1.1x; epoch 6 compares
    # (1.2 + 1.5)/2 = 1.35 with (1 + 1)/2: 1.35x > 1.3, keeping epoch 4.
    summaries = _summaries([1.0, 1.0, 1.0, 1.0, 1.2, 1.5])
    decisions = [rule.check(summaries[:n]) for n in range(1, 7)]
    assert decisions[:5] == [None] * 5
    assert (decisions[5].epoch, decisions[5].kept_epoch) == (6, 4)
    assert "1.35x" in decisions[5].reason
    # Magnitudes: a negative eigenvalue growing in size grows too.
    assert rule.check(_summaries([-1.0, -1.0, -1.0, -1.0, -1.2, -1.5])).kept_epoch == 4
    # Not before --early_stop_after: the same growth by epoch 6 is ignored with after=6.
    assert EarlyStop.parse("hessian", 2, 6, 1.3).check(summaries) is None


def test_hessian_rule_counts_measurements_when_not_every_epoch_has_one():
    """--hessian_every 2: measurements at epochs 2, 4, 6, 8; a window of 1 measurement."""
    rule = EarlyStop.parse("hessian", 1, 0, 1.3)
    summaries = _summaries([None, 1.0, None, 1.1, None, 2.0, None])
    assert rule.check(summaries[:5]) is None  # epoch 5 has no measurement
    assert rule.check(summaries[:4]) is None  # 1.1x
    stop = rule.check(summaries[:6])
    assert (stop.epoch, stop.kept_epoch) == (6, 4)
    assert rule.check(summaries) is None


# -- metrics.csv and TensorBoard ------------------------------------------------------------

def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_rows_columns_and_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    metrics = Metrics(str(tmp_path))
    assert metrics.writer is None and "not installed" in metrics.describe()
    metrics.write(1, {"loss": 2.5, "acc": 10.0})
    metrics.write(2, {"loss": 0.1 + 0.2, "acc": 12.5, "eigenvalue": -0.03})
    metrics.write(3, {"loss": 1.5, "acc": 20.0})
    rows = _rows(tmp_path / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "loss", "acc", "eigenvalue"]
    assert rows[0]["eigenvalue"] == "" and float(rows[1]["eigenvalue"]) == -0.03
    assert float(rows[1]["loss"]) == 0.1 + 0.2  # full precision
    # A run resumed after epoch 1 redoes epoch 2: the rows after it go.
    Metrics(str(tmp_path), resumed_after=1).write(2, {"loss": 1.0, "acc": 11.0})
    rows = _rows(tmp_path / "metrics.csv")
    assert [(row["epoch"], row["loss"]) for row in rows] == [("1", "2.5"), ("2", "1.0")]
    assert not (tmp_path / "tensorboard").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary files
    Metrics(None).write(1, {"loss": 1.0})  # other ranks: nothing


def test_tensorboard_scalars_and_images_when_installed(tmp_path, monkeypatch):
    calls = []

    class SummaryWriter:  # the part of TensorBoard's interface the runs use
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def add_image(self, tag, image, step, dataformats):
            calls.append(("image", tag, image.shape, image.dtype, step, dataformats))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=SummaryWriter))
    metrics = Metrics(str(tmp_path), resumed_after=4)
    assert "TensorBoard" in metrics.describe() and "not installed" not in metrics.describe()
    metrics.write(5, {"loss": 1.5}, {"arch/alphas_normal": heatmap_image(np.full((14, 8), 0.125))})
    metrics.close()
    assert calls == [("init", str(tmp_path / "tensorboard"), 5), ("scalar", "loss", 1.5, 5),
                     ("image", "arch/alphas_normal", (14 * 8, 8 * 8, 3), np.uint8, 5, "HWC"),
                     ("flush",), ("close",)]
    assert _rows(tmp_path / "metrics.csv") == [{"epoch": "5", "loss": "1.5"}]


def test_heatmap_image_uses_the_shared_zero_to_one_scale():
    image = heatmap_image([[0.0, 1.0]], scale=2)
    assert image.shape == (2, 4, 3)
    assert (image[:, :2] == image[0, 0]).all() and (image[:, 2:] == image[0, 3]).all()
    assert not np.array_equal(image[0, 0], image[0, 3])
    assert np.array_equal(heatmap_image([2.0])[0, 0], image[0, 3])  # clipped to 1
