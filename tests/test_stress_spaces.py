"""The operation spaces (``--space``): RobustDARTS's stress spaces s1-s4 beside DARTS's.

Their computation against RobustDARTS's own is test_stress_spaces_reference.py; here:
edges with their own candidates batched per state (s1), the noise op under
recomputation and in the Hessian, names in the history and heatmaps, the space in the
genotype file, and bad input (one line, before any work).  Tiny supernets (C=4, 3 cells,
8x8 images).  Slow: a search in s4 end to end, its cell (noise included) trained, tested,
drawn and costed."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from training_helpers import mini_cifar, only_run_dir, reported_accuracy, run_in_process

import genotypes
import plot_search
from architect import Architect
from genotypes import OPERATION_SPACES, genotype_from_dict, genotype_to_dict, space_operations
from model import NetworkCIFAR
from model_search import Network
from operations import Noise
from runtime import curvature, pipeline, result_card, searching
from runtime.dispatch import HostSyncGuard, OpCounter
from runtime.errors import UserError
from runtime.experiment import load_checkpoint
from runtime.metrics import heatmap_image
from runtime.precision import Precision

pytestmark = pytest.mark.usefixtures("one_thread")


def _network(space: str, location: str = "no_attention", **kwargs) -> Network:
    torch.manual_seed(0)
    return Network(4, 10, 3, nn.CrossEntropyLoss(), location, image_size=8,
                   operation_space=space, **kwargs)


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([1, 2, 3, 4])


# -- the spaces as data -----------------------------------------------------------------------

def test_spaces_are_robustdarts_lists():
    assert list(OPERATION_SPACES) == ["darts", "s1", "s2", "s3", "s4"]
    assert space_operations("darts", "reduce", 14) == [tuple(genotypes.PRIMITIVES)] * 14
    assert space_operations("s3", "normal", 5) == [("none", "skip_connect", "sep_conv_3x3")] * 5
    normal, reduce = space_operations("s1", "normal", 14), space_operations("s1", "reduce", 14)
    # Their src/spaces.py: normal edge 0, reduce edges 0 and 4, the last edges.
    assert normal[0] == ("skip_connect", "dil_conv_3x3") and normal[5] == ("max_pool_3x3", "skip_connect")
    assert reduce[0] == ("max_pool_3x3", "avg_pool_3x3") and reduce[4] == ("skip_connect", "dil_conv_5x5")
    assert normal[13] == ("dil_conv_3x3", "dil_conv_5x5") and reduce[13] == ("skip_connect", "dil_conv_5x5")
    with pytest.raises(ValueError, match="14 edges"):
        space_operations("s1", "normal", 5)


@pytest.mark.parametrize("location, columns", [("after_every", (2, 6)), ("double_mixed", (7, 7)),
                                               ("mixed_with_operation", (7, None))])
def test_attentions_stay_beside_each_edges_own_operations(location, columns):
    network = _network("s1", location)
    first = network.edge_candidates["alphas_reduce"]
    attentions = ("SE", "BAM", "CBAM", "GE_theta-plus", "DoubleAttention")
    assert network.alphas_reduce.shape == (14, columns[0])
    if location == "after_every":
        assert first == space_operations("s1", "reduce", 14)
        assert network.edge_candidates["betas_reduce"] == [tuple(genotypes.ATTN_PRIMITIVES)] * 14
    else:  # the mixtures: the edge's pair, then the attention modules
        assert first == [row + attentions for row in space_operations("s1", "reduce", 14)]
    if columns[1] == 7:  # double_mixed: the second mixture too
        assert network.edge_candidates["betas_reduce"] == first


def test_edges_with_their_own_candidates_cost_fewer_ops_than_darts():
    """s1 builds each distinct candidate of a state once, for its edges only: a forward
    dispatches fewer ATen ops than DARTS's 7 built candidates per state."""
    counts = {}
    images, _ = _batch()
    for space in ("darts", "s1", "s2"):
        network = _network(space).train()
        with OpCounter() as ops:
            network(images)
        counts[space] = ops.total
    assert counts["s2"] < counts["s1"] < 0.6 * counts["darts"], counts


def test_search_iterations_never_wait_for_the_device():
    """s1's gathers and index_adds, recomputed cells as on the CPU."""
    network = _network("s1", recompute=True)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, foreach=True)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=False)
    precision = Precision(False, "bfloat16", torch.device("cpu"))
    batch = _batch()
    searching.search_step(network, architect, optimizer, precision, batch, batch, 0.025, 5.0)
    before = network.alphas_normal.detach().clone()
    with HostSyncGuard([state["step"] for state in architect.optimizer.state.values()]):
        for _ in range(3):
            loss, _ = searching.search_step(network, architect, optimizer, precision, batch, batch,
                                            0.025, 5.0)
    assert torch.isfinite(loss) and not torch.equal(before, network.alphas_normal)


# -- the noise op -------------------------------------------------------------------------------

def test_recomputed_cells_replay_the_noise_their_forward_drew():
    images, targets = _batch()
    results = []
    for recompute in (False, True):
        network = _network("s4", "after_every", recompute=recompute).train()
        torch.manual_seed(5)
        loss = network.loss(images, targets)
        grads = torch.autograd.grad(loss, list(network.parameters()))
        results.append((loss, grads, torch.get_rng_state()))
    (loss, grads, state), (loss_r, grads_r, state_r) = results
    assert torch.equal(loss, loss_r) and torch.equal(state, state_r)  # no extra draws
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    noise_column = network.edge_candidates["alphas_normal"][0].index("noise")
    assert grads_r[list(dict(network.named_parameters())).index("alphas_normal")][
        :, noise_column].abs().min() > 0


def test_hessian_sees_one_noise_and_leaves_the_random_stream_alone():
    torch.manual_seed(2)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "no_attention", steps=1, multiplier=1,
                      image_size=8, operation_space="s4")
    batches = [_batch()]
    state = torch.get_rng_state()
    first = curvature.dominant_eigenvalue(network, batches, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert curvature.dominant_eigenvalue(network, batches, 5) == first
    vector = [torch.randn_like(p) for p in network.arch_parameters()]
    with curvature.double_backward_mode(network), torch.random.fork_rng(devices=[]):
        products = [curvature.hessian_vector_product(network, batches, vector) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*products))  # one Hessian for every product


def test_final_network_draws_fresh_noise_in_eval_mode_too():
    data = {"normal": [["noise", 0], ["sep_conv_3x3", 1]], "normal_concat": [2],
            "reduce": [["noise", 0], ["noise", 1]], "reduce_concat": [2], "space": "s4"}
    genotype = genotype_from_dict(data)
    network = NetworkCIFAR(4, 10, 3, False, genotype).eval()
    assert isinstance(network.cells[1]._first_layers[0], Noise)
    images, _ = _batch()
    with torch.no_grad():
        assert not torch.equal(network(images)[0], network(images)[0])
    assert all(network.cells[0]._droppable)  # drop path applies to noise, as in their release


# -- names, history, heatmaps, genotype file ------------------------------------------------------

def test_history_names_each_edges_own_candidates_where_they_differ():
    names = searching.candidate_names(_network("s1", "after_every"))
    assert names["alphas_normal"] == [list(row) for row in space_operations("s1", "normal", 14)]
    assert names["betas_normal"] == list(genotypes.ATTN_PRIMITIVES)  # the same on every edge
    assert searching.candidate_names(_network("s3"))["alphas_reduce"] == [
        "none", "skip_connect", "sep_conv_3x3"]
    log = searching.describe_space(_network("s1"))
    assert "each edge its own candidates" in log and "reduce cells 0<-0 max_pool_3x3/avg_pool_3x3" in log
    assert searching.describe_space(_network("s2")).endswith(
        "every edge chooses from skip_connect, sep_conv_3x3")


def test_heatmap_of_differing_rows_spans_the_union_of_their_candidates():
    weights = [[0.25, 0.75], [0.5, 0.5]]
    image = heatmap_image(weights, [["a", "b"], ["b", "c"]], scale=1)
    assert image.shape == (2, 3, 3)
    grey = np.array([211, 211, 211])
    assert (image[0, 2] == grey).all() and (image[1, 0] == grey).all()
    assert (image[0, 1] == heatmap_image([[0.75]], scale=1)[0, 0]).all()
    assert (heatmap_image(weights, ["a", "b"]) == heatmap_image(weights)).all()


def test_plot_search_draws_per_edge_names_and_refuses_misfits(tmp_path):
    network = _network("s1")
    record = {"epoch": 1, "arch": network.softmaxed_arch(),
              "candidates": searching.candidate_names(network)}
    history = [record, {**record, "epoch": 2}]
    values, names = plot_search.collect_params(history)["alphas_reduce"]
    assert names[5] == ["max_pool_3x3", "avg_pool_3x3"] and values.shape == (2, 14, 2)
    plot_search.plot_edges(values, names, [1, 2], "alphas_reduce", str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 0
    bad = {**record, "candidates": {"alphas_normal": [["a", "b"]] * 13}}
    with pytest.raises(UserError, match="candidates.alphas_normal does not list 2 names"):
        plot_search.collect_params([bad])


def test_genotype_file_records_the_space_and_checks_its_operations(tmp_path):
    network = _network("s4")
    genotype = network.genotype()
    data = genotype_to_dict(genotype)
    assert data["space"] == "s4" and genotype_from_dict(data) == genotype
    assert "space" not in genotype_to_dict(_network("darts").genotype())
    assert genotype_from_dict({k: v for k, v in data.items() if k != "space"}).space == "darts"
    with pytest.raises(UserError, match=r"g.json: field 'space': unknown operation space 's9'; "
                                        r"valid: 'darts', 's1'"):
        genotype_from_dict({**data, "space": "s9"}, "g.json")
    data["normal"][3][0] = "max_pool_3x3"
    with pytest.raises(UserError, match=r"field 'normal'\[3\]: operation 'max_pool_3x3' is not a "
                                        r"candidate of its edge \(node 1 <- \d\) in space s4: "
                                        r"noise, sep_conv_3x3"):
        genotype_from_dict(data, "g.json")
    s1 = genotype_to_dict(_network("s1").genotype())
    with pytest.raises(UserError, match="defines 14 edges per cell"):
        genotype_from_dict({**s1, "normal": s1["normal"][:6], "normal_concat": [2, 3, 4]})


# -- bad input: one line, before any work --------------------------------------------------------

def test_unknown_space_is_one_line_for_the_search_and_reproduce(tmp_path):
    args = argparse.Namespace(space="s5", init_ch=4, layers=3, partial_channels=1,
                              edge_norm="auto", arch_warmup_epochs=0)
    with pytest.raises(UserError) as error:
        searching.check_search_space_flags(args)
    assert str(error.value) == ("--space: unknown operation space 's5'; valid: 'darts', 's1', "
                                "'s2', 's3', 's4'")
    parser = argparse.ArgumentParser()
    pipeline.add_reproduce_args(parser)
    with pytest.raises(UserError, match="--space: unknown operation space 'S2'"):
        pipeline.resolve_settings(parser.parse_args(["--preset", "tiny", "--space", "S2"]))
    with pytest.raises(ValueError, match="14 edges"):
        Network(4, 10, 3, nn.CrossEntropyLoss(), "no_attention", steps=3, operation_space="s1")


def test_reproduce_passes_the_space_and_the_card_names_it(tmp_path):
    parser = argparse.ArgumentParser()
    pipeline.add_reproduce_args(parser)
    options = parser.parse_args(["--preset", "tiny", "--space", "s3", "--location", "end"])
    settings = pipeline.resolve_settings(options)
    flags = pipeline.search_jobs(settings, options, str(tmp_path))[0].flags
    assert flags[flags.index("--space") + 1] == "s3"
    plain = parser.parse_args(["--preset", "tiny"])
    assert "--space" not in pipeline.search_jobs(pipeline.resolve_settings(plain), plain,
                                                 str(tmp_path))[0].flags
    card = result_card.Card(str(tmp_path), settings, {"settings": settings, "jobs": {}},
                            argparse.Namespace(data=str(tmp_path)))
    assert "Searched in operation space s3, attention at location end" in result_card.markdown(
        card.summary())


@pytest.mark.parametrize("saved, resumed, refused", [
    ({"space": "s1"}, "s2", "--space s1, not s2"),
    ({}, "s3", "--space darts, not s3"),  # a checkpoint from before --space: darts
    ({}, "darts", None),
])
def test_checkpoint_of_another_space_is_refused_in_one_line(tmp_path, saved, resumed, refused):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {}, "scaler": {}, "epoch": 1, "rng": [], "genotype": {},
                "args": {"seed": 2, **saved}}, path)
    args = argparse.Namespace(seed=2, space=resumed)
    if refused is None:
        load_checkpoint(str(path), args, "search", (), earlier=searching.EARLIER_FLAGS)
        return
    with pytest.raises(UserError) as error:
        load_checkpoint(str(path), args, "search", (), earlier=searching.EARLIER_FLAGS)
    assert refused in str(error.value) and "\n" not in str(error.value)



# -- slow: a search in s4 end to end, its cell trained and tested -------------------------------

@pytest.mark.slow
def test_s4_search_then_its_cell_with_noise_trains_tests_draws_and_costs(cifar_mini, tmp_path):
    """train_search.py --space s4 (3 iterations on 24 images), then the final network
    of its genotype.json, noise ops included, trained for an epoch (5 iterations),
    tested from its trained.pt, drawn and costed.  Nothing here is resumed or killed: every
    script runs in this process (``run_in_process``)."""
    data = mini_cifar(cifar_mini, tmp_path / "data", train=4, val=1)
    search = run_in_process("train_search.py", "--data", str(data), "--exp_path",
                            str(tmp_path / "search"), "--init_ch", "4", "--layers", "3",
                            "--batchsz", "8", "--train_portion", "0.6", "--workers", "0",
                            "--epochs", "1", "--space", "s4", env={"ATT_DARTS_TRACE_ARCH": "1"})
    assert search.returncode == 0, search.stderr[-3000:]
    assert search.stdout.count("architecture sha256") == 3
    run = only_run_dir(tmp_path / "search")
    genotype_path = str(run / "genotype.json")
    genotype = genotypes.load_genotype(genotype_path)
    assert genotype.space == "s4"
    operations = {op for op, _, _ in genotype.normal + genotype.reduce}
    assert operations == {"noise", "sep_conv_3x3"}, operations  # this seed keeps both
    log = (run / "log.txt").read_text()
    assert "operation space s4: every edge chooses from noise, sep_conv_3x3" in log
    history = json.loads((run / "arch_history.jsonl").read_text())
    assert history["candidates"]["alphas_normal"] == ["noise", "sep_conv_3x3"]

    small = ["--data", str(data), "--arch_path", genotype_path, "--init_ch", "4", "--layers", "3",
             "--batchsz", "8", "--workers", "0", "--auxiliary"]
    results = {
        "train": run_in_process("train_CIFAR10.py", *small, "--epochs", "1", "--exp_path",
                                str(tmp_path / "train")),
        "draw": run_in_process("visualize.py", genotype_path, "--save_dir",
                               str(tmp_path / "drawn"), "--without_view"),
        "cost": run_in_process("cost.py", "--arch_path", genotype_path, "--init_ch", "4",
                               "--layers", "3", "--batch", "2", "--repeats", "1")}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    trained = only_run_dir(tmp_path / "train")
    assert "space='s4'" in (trained / "log.txt").read_text()
    assert genotypes.load_genotype(str(trained / "genotype.json")) == genotype
    drawn = sorted((tmp_path / "drawn").iterdir())
    assert [p.name.split(".")[0] for p in drawn] == ["genotype_normal", "genotype_reduction"]
    if drawn[0].suffix == ".gv":  # without Graphviz's dot
        assert "noise" in drawn[0].read_text()
    assert "parameters" in results["cost"].stdout
    tested = run_in_process("test_CIFAR10.py", *small, "--model_path", str(trained / "trained.pt"))
    assert tested.returncode == 0, tested.stderr[-3000:]
    [(k, _, _, total)] = reported_accuracy(tested.stdout)[:1]
    assert (k, total) == (1, 10)
