"""complexity.py and cost.py: parameters, multiply-accumulates, peak memory, latency."""
import re

import pytest
import torch
import torch.nn as nn
from training_helpers import one_line_error, run_in_process, run_ok

import genotypes
from genotypes import Genotype
from model import NetworkCIFAR, NetworkImageNet
from runtime import complexity

# Every attention module, a cell-end attention, and every kind of convolution.
ALL_KINDS = Genotype(
    normal=[("sep_conv_3x3", 0, "SE"), ("dil_conv_3x3", 1, "GE_theta-plus"),
            ("skip_connect", 2, "CBAM"), ("avg_pool_3x3", 0, "")],
    normal_concat=[2, 3],
    reduce=[("max_pool_3x3", 0, "BAM"), ("skip_connect", 1, "DoubleAttention")],
    reduce_concat=[2],
    normal_bottleneck="SE",
)
SMALL = ["--init_ch", "4", "--layers", "3", "--batch", "2", "--repeats", "1"]


def conv(c_in: int, c_out: int, kernel: int, side: int, groups: int = 1) -> int:
    """MACs of a convolution with a square output of side ``side``."""
    return c_out * (c_in // groups) * kernel * kernel * side * side


def linear(c_in: int, c_out: int) -> int:
    return c_in * c_out


def test_macs_of_a_small_network_match_a_count_by_hand():
    """NetworkCIFAR(C=4, 3 cells, 8x8 input): a normal cell (C=4, 8x8), two reduction
    cells (C=8 at 4x4, C=16 at 2x2).  Attention widths: hidden max(1, C // 16) = 1,
    double attention c_m = c_n = C // 4."""
    stem = conv(3, 12, 3, 8)
    # Cell 0, normal, 12 + 12 channels in, C=4 at 8x8; output 2 x 4 = 8 channels.
    sep_conv = 2 * (conv(4, 4, 3, 8, groups=4) + conv(4, 4, 1, 8))
    se = linear(4, 1) + linear(1, 4)
    dil_conv = conv(4, 4, 3, 8, groups=4) + conv(4, 4, 1, 8)
    gather_excite = conv(4, 4, 8, 1, groups=4) + conv(4, 1, 1, 1) + conv(1, 4, 1, 1)
    cbam = 2 * (linear(4, 1) + linear(1, 4)) + conv(2, 1, 7, 8)  # MLP on avg and max
    bottleneck_se = linear(8, 1) + linear(1, 8)
    cell0 = (2 * conv(12, 4, 1, 8) + sep_conv + se + dil_conv + gather_excite + cbam
             + bottleneck_se)
    # Cell 1, reduction, inputs 12 and 8 channels at 8x8, C=8 at 4x4.
    bam = (linear(8, 1) + linear(1, 8)                                # channel gate
           + conv(8, 1, 1, 4) + 2 * conv(1, 1, 3, 4) + conv(1, 1, 1, 4))  # spatial gate
    factorized_reduce = 2 * conv(8, 4, 1, 4)
    double_attention = 3 * conv(8, 2, 1, 4) + conv(2, 8, 1, 4) + 2 * (2 * 2 * 16)  # two bmm
    cell1 = conv(12, 8, 1, 8) + conv(8, 8, 1, 8) + bam + factorized_reduce + double_attention
    # Cell 2, reduction, inputs 8 channels at 8x8 (factorized reduce) and 8 at 4x4, C=16 at 2x2.
    preprocess = 2 * conv(8, 8, 1, 4) + conv(8, 16, 1, 4)
    bam = (linear(16, 1) + linear(1, 16)
           + conv(16, 1, 1, 2) + 2 * conv(1, 1, 3, 2) + conv(1, 1, 1, 2))
    factorized_reduce = 2 * conv(16, 8, 1, 2)
    double_attention = 3 * conv(16, 4, 1, 2) + conv(4, 16, 1, 2) + 2 * (4 * 4 * 4)
    cell2 = preprocess + bam + factorized_reduce + double_attention
    classifier = linear(16, 10)
    by_hand = stem + cell0 + cell1 + cell2 + classifier
    assert by_hand == 62_908

    model = NetworkCIFAR(4, 10, 3, False, ALL_KINDS, image_size=8)
    assert complexity.count_macs(model, (3, 8, 8)) == by_hand


def test_parameters_leave_out_the_auxiliary_head():
    with_head = NetworkCIFAR(4, 10, 3, True, genotypes.Att_DARTS)
    without = NetworkCIFAR(4, 10, 3, False, genotypes.Att_DARTS)
    total = sum(p.numel() for p in without.parameters())
    assert complexity.count_parameters(with_head) == complexity.count_parameters(without) == total
    head = sum(p.numel() for p in with_head.auxiliary_head.parameters())
    assert head > 0 and sum(p.numel() for p in with_head.parameters()) == total + head


def test_published_figures():
    """3.2 M / 3.3 M on CIFAR-10 and 4.6 M / 4.7 M on ImageNet (Att_DARTS / DARTS_V2);
    both fit ImageNet's mobile setting."""
    cifar = {name: complexity.count_parameters(
                 NetworkCIFAR(36, 10, 20, True, genotypes.NAMED_GENOTYPES[name]))
             for name in ("Att_DARTS", "DARTS_V2")}
    assert cifar["Att_DARTS"] == 3_231_343  # the original release, ../shared/reference
    assert round(cifar["DARTS_V2"] / 1e6, 1) == 3.3
    for name, published in [("Att_DARTS", 4.6), ("DARTS_V2", 4.7)]:
        model = NetworkImageNet(48, 1000, 14, True, genotypes.NAMED_GENOTYPES[name])
        assert round(complexity.count_parameters(model) / 1e6, 1) == published
        assert complexity.count_macs(model, (3, 224, 224)) <= complexity.MOBILE_SETTING_MACS


def test_peak_memory_counts_the_tensors_alive():
    """Weights + input + the outputs of the current and previous convolution: the
    first output is freed before the third is made."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.Conv2d(8, 3, 3, padding=1, bias=False))
    weights = 8 * 3 * 9 + 8 * 8 * 9 + 3 * 8 * 9
    pixels = 16 * 16
    float32 = 4
    for batch in (1, 3):
        expected = float32 * (weights + batch * (3 + 8 + 8) * pixels)
        assert complexity.measure_peak_memory(model, (3, 16, 16), batch) == expected


def test_peak_memory_is_positive_and_grows_with_the_batch():
    model = NetworkCIFAR(4, 10, 3, False, genotypes.Att_DARTS)
    peaks = [complexity.measure_peak_memory(model, (3, 32, 32), batch) for batch in (1, 2, 4)]
    assert 0 < peaks[0] < peaks[1] < peaks[2]


def test_measuring_leaves_modes_statistics_and_rng_unchanged():
    torch.manual_seed(0)
    model = NetworkCIFAR(4, 10, 3, True, genotypes.Att_DARTS)
    model.train()
    model.auxiliary_head.eval()  # a mixed state must survive too
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    cost = complexity.measure(model, (3, 32, 32), (1, 2), repeats=1)

    assert cost.macs > 0 and all(b.peak_bytes > 0 and b.latency_s > 0 for b in cost.batches)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN running statistics included
    assert torch.equal(torch.get_rng_state(), rng)


def reported(stdout: str, label: str) -> int:
    """The integer at the start of a line of cost.py's report ('parameters', 'MACs')."""
    return int(re.search(rf"^{label}\s+([\d,]+)", stdout, re.M).group(1).replace(",", ""))


@pytest.mark.slow
def test_script_reports_the_counts_of_the_network(tmp_path):
    result = run_ok("cost.py", "--arch", "DARTS_V2", *SMALL)
    model = NetworkCIFAR(4, 10, 3, False, genotypes.DARTS_V2)
    assert reported(result.stdout, "parameters") == complexity.count_parameters(model)
    assert reported(result.stdout, "MACs") == complexity.count_macs(model, (3, 32, 32))
    assert re.search(r"^batch 1 .*peak memory [\d.]+ MB, latency [\d.]+ ms$", result.stdout, re.M)
    assert re.search(r"^batch 2 ", result.stdout, re.M)
    assert "mobile setting" not in result.stdout

    path = tmp_path / "genotype.json"
    genotypes.save_genotype(ALL_KINDS, str(path))
    result = run_ok("cost.py", "--arch_path", str(path), "--dataset", "cifar100", "--auxiliary",
                    *SMALL)
    model = NetworkCIFAR(4, 100, 3, True, ALL_KINDS)
    assert reported(result.stdout, "parameters") == complexity.count_parameters(model)
    assert reported(result.stdout, "MACs") == complexity.count_macs(model, (3, 32, 32))
    assert "the auxiliary head has" in result.stdout


@pytest.mark.slow
def test_script_on_imagenet_says_whether_the_mobile_setting_fits():
    result = run_ok("cost.py", "--arch", "Att_DARTS", "--dataset", "imagenet", *SMALL)
    model = NetworkImageNet(4, 1000, 3, False, genotypes.Att_DARTS)
    macs = complexity.count_macs(model, (3, 224, 224))
    assert reported(result.stdout, "MACs") == macs
    assert f"mobile setting (at most 600 M MACs): fits ({macs / 1e6:.1f} M)" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--arch", "ResNet"], "unknown --arch 'ResNet'"),
    (["--arch_path", "missing.json"], "cannot read genotype file missing.json"),
    (["--dataset", "svhn"], "unknown --dataset 'svhn'"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--dataset", "imagenet", "--init_ch", "5"], "--init_ch must be even on imagenet"),
])
def test_bad_input_gives_one_line(flags, message):
    assert message in one_line_error(run_in_process("cost.py", *flags))
