"""The collapse fixes' flags and plumbing (their computations: test_collapse_fixes_reference.py):
bad values and combinations are one line before any work, a checkpoint of other fixes
is refused, the result card names them, their search steps never wait for the device,
and a threshold cell (fewer than two edges per node) is read, built, drawn and costed."""
import argparse
import json

import pytest
import torch
import torch.nn as nn

import train_search
import visualize
from architect import Architect
from genotypes import genotype_from_dict, load_genotype, save_genotype
from model import NetworkCIFAR
from model_search import Network
from runtime import collapse_fixes, pipeline, result_card, searching
from runtime.complexity import count_macs
from runtime.dispatch import HostSyncGuard
from runtime.errors import UserError
from runtime.experiment import load_checkpoint
from runtime.precision import Precision
from runtime.searching import EARLIER_FLAGS, search_step

# A threshold cell: node 0 <- input 1; node 1 <- input 0 and node 0; node 2 keeps no
# edge; node 3 <- node 1.
THRESHOLD_CELL = {"normal": [["sep_conv_3x3", 1, "", 2], ["skip_connect", 0, "", 3],
                             ["dil_conv_3x3", 2, "", 3], ["max_pool_3x3", 3, "", 5]],
                  "normal_concat": [2, 3, 5],
                  "reduce": [["max_pool_3x3", 0, "", 2], ["sep_conv_5x5", 1, "", 4]],
                  "reduce_concat": [2, 4]}


@pytest.mark.parametrize("argv, words", [
    (["--beta_decay", "-1"], "--beta_decay must be a finite weight >= 0"),
    (["--zero_one_weight", "10"], "give --relaxation sigmoid"),
    (["--relaxation", "sigmoid", "--beta_decay", "5"], "--beta_decay regularises the softmax"),
    (["--relaxation", "sigmoid", "--perturb_alpha", "adversarial"], "perturbs softmax(alpha)"),
    (["--perturb_alpha", "random", "--perturb_epsilon", "0"], "--perturb_epsilon must be a positive"),
    (["--relaxation", "sigmoid", "--op_threshold", "1.5"], "--op_threshold must be in (0, 1]"),
    (["--op_threshold", "0.5"], "--op_threshold is a setting of --relaxation sigmoid"),
    (["--aux_skip_decay", "cosine"], "--aux_skip_decay is a setting of --aux_skip"),
    (["--perturb_epsilon", "0.1"], "--perturb_epsilon is a setting of --perturb_alpha"),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, argv, words):
    args = train_search.parser.parse_args(["--data", str(tmp_path / "nothing"), "--exp_path",
                                           str(tmp_path / "exp"), *argv])
    with pytest.raises(UserError) as info:
        searching.search(args)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "exp").exists()


def test_unknown_choices_are_refused_by_the_parser(capsys):
    for argv in (["--relaxation", "tanh"], ["--perturb_alpha", "pgd"], ["--aux_skip_decay", "step"]):
        with pytest.raises(SystemExit):
            train_search.parser.parse_args(argv)
        assert "invalid choice" in capsys.readouterr().err


def test_a_checkpoint_of_other_fixes_is_refused_older_ones_count_as_none(tmp_path):
    base = vars(train_search.parser.parse_args([]))
    older = {k: v for k, v in base.items() if k not in collapse_fixes.EARLIER_FLAGS}
    path = tmp_path / "checkpoint.pt"
    keys = ("state_dict", "scaler", "epoch", "rng", "args", "genotype", "weight_optimizer",
            "arch_optimizer", "arch_batches")
    earlier = {**EARLIER_FLAGS, **collapse_fixes.EARLIER_FLAGS}
    torch.save({**{key: {} for key in keys}, "args": older}, path)
    same = argparse.Namespace(**base)
    load_checkpoint(str(path), same, "search", keys[6:], earlier=earlier)  # no fixes: resumes
    for flag, value in (("beta_decay", 50.0), ("aux_skip", True), ("relaxation", "sigmoid"),
                        ("perturb_alpha", "random")):
        with pytest.raises(UserError) as info:
            load_checkpoint(str(path), argparse.Namespace(**{**base, flag: value}), "search",
                            keys[6:], earlier=earlier)
        assert f"--{flag}" in str(info.value) and "\n" not in str(info.value)
    torch.save({**{key: {} for key in keys}, "args": {**base, "perturb_epsilon": 0.2}}, path)
    with pytest.raises(UserError, match="--perturb_epsilon 0.2"):
        load_checkpoint(str(path), same, "search", keys[6:], earlier=earlier)


def test_the_result_card_and_the_log_name_the_fixes(tmp_path):
    settings = {**pipeline.PRESETS["tiny"], "dataset": "cifar10",
                "search_args": "--beta_decay 50 --aux_skip --perturb_alpha random --seed 3"}
    card = result_card.Card(str(tmp_path), settings, {"settings": {}, "jobs": {}},
                            argparse.Namespace(data=str(tmp_path)))
    summary = card.write()
    expected = ("beta-DARTS (--beta_decay 50) + DARTS- (--aux_skip, linear decay) + "
                "SDARTS-RS (--perturb_epsilon 0.3)")
    assert summary["search_variant"] == expected
    assert f"Search: {expected}" in (tmp_path / result_card.CARD_MD).read_text()
    plain = collapse_fixes.describe(train_search.parser.parse_args([]))
    assert plain == "plain DARTS (no collapse fix)"
    fair = collapse_fixes.describe(train_search.parser.parse_args(
        ["--relaxation", "sigmoid", "--zero_one_weight", "10"]))
    assert fair == "FairDARTS (sigmoid relaxation, --zero_one_weight 10, --op_threshold 0.85)"


@pytest.mark.parametrize("fixes", [
    ["--beta_decay", "50", "--aux_skip", "--perturb_alpha", "random"],
    pytest.param(["--relaxation", "sigmoid", "--zero_one_weight", "10", "--aux_skip"],
                 marks=pytest.mark.slow),
    pytest.param(["--perturb_alpha", "adversarial", "--unrolled"], marks=pytest.mark.slow),
])
def test_search_iterations_with_fixes_never_wait_for_the_device(one_thread, fixes):
    args = train_search.parser.parse_args(["--epochs", "4", *fixes])
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "end", image_size=8,
                      relaxation=args.relaxation, aux_skip=args.aux_skip)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, foreach=True)
    variant = collapse_fixes.Variant(args, network)
    variant.start_epoch(2)
    architect = Architect(network, optimizer, 3e-4, 1e-3, args.unrolled, variant=variant)
    precision = Precision(False, "bfloat16", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator),
                torch.randint(0, 10, (4,), generator=generator)) for _ in range(6)]
    search_step(network, architect, optimizer, precision, batches[0], batches[1], 0.025, 5.0)
    steps = [state["step"] for state in architect.optimizer.state.values()]
    with HostSyncGuard(steps):
        for i in (2, 4):
            loss, _ = search_step(network, architect, optimizer, precision, batches[i],
                                  batches[i + 1], 0.025, 5.0)
    assert torch.isfinite(loss) and network.training


def test_a_threshold_cell_is_read_built_drawn_and_costed(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(THRESHOLD_CELL))
    genotype = load_genotype(str(path))
    assert genotype.normal[2] == ("dil_conv_3x3", 2, "", 3)
    save_genotype(genotype, str(tmp_path / "again.json"))
    assert load_genotype(str(tmp_path / "again.json")) == genotype
    network = NetworkCIFAR(4, 10, 5, True, genotype)
    assert network.cells[0].multiplier == 3 and network.cells[1].multiplier == 2
    logits, aux = network.train()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    assert count_macs(network.eval(), (3, 32, 32)) > 0
    source = visualize.cell_graph(genotype.normal, genotype.normal_concat, "").source
    assert '"c_{k-1}" -> 0' in source and "0 -> 1" in source and "1 -> 3" in source
    assert "\t2 [" not in source  # node 2 kept no edge: not drawn


@pytest.mark.parametrize("edges, concat, words", [
    ([["sep_conv_3x3", 1, "", 3], ["skip_connect", 0, "", 2]], [2, 3], "node 2 is invalid"),
    ([["sep_conv_3x3", 1, "", 3], ["skip_connect", 2, "", 4]], [3, 4], "input index 2 is invalid"),
    ([["sep_conv_3x3", 1, "", 2], ["skip_connect", 0, ""]], [2], "for every edge"),
    ([["sep_conv_3x3", 1, "", 2]], [2, 3], "states among 0, 1, 2"),
    ([], [2], "an empty one only for a cell without edges"),
])
def test_bad_threshold_cells_are_one_line(edges, concat, words):
    with pytest.raises(UserError) as info:
        genotype_from_dict({**THRESHOLD_CELL, "normal": edges, "normal_concat": concat}, "g.json")
    assert words in str(info.value) and "g.json: field 'normal" in str(info.value)


def test_a_cell_without_edges_is_one_line_when_built():
    genotype = genotype_from_dict({**THRESHOLD_CELL, "reduce": [], "reduce_concat": []})
    with pytest.raises(UserError, match="reduction cell has no edge"):
        NetworkCIFAR(4, 10, 5, False, genotype)
