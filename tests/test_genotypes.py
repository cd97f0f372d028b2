"""Genotypes: the published cells and the JSON file form."""
import json

import pytest

import genotypes
from genotypes import NAMED_GENOTYPES, Genotype, load_genotype, save_genotype
from runtime.errors import UserError


def _pairs(text):
    """'op j, op j | ...' shorthand -> list of (op, j, '')."""
    edges = []
    for node in text.split("|"):
        for edge in node.split(","):
            op, j = edge.split()
            edges.append((op, int(j), ""))
    return edges


# Transcribed from the cells published with DARTS (NASNet and AmoebaNet from their papers).
SPEC_CELLS = {
    "DARTS_V1": (
        _pairs("sep_conv_3x3 1, sep_conv_3x3 0 | skip_connect 0, sep_conv_3x3 1 | "
               "skip_connect 0, sep_conv_3x3 1 | sep_conv_3x3 0, skip_connect 2"), [2, 3, 4, 5],
        _pairs("max_pool_3x3 0, max_pool_3x3 1 | skip_connect 2, max_pool_3x3 0 | "
               "max_pool_3x3 0, skip_connect 2 | skip_connect 2, avg_pool_3x3 0"), [2, 3, 4, 5]),
    "DARTS_V2": (
        _pairs("sep_conv_3x3 0, sep_conv_3x3 1 | sep_conv_3x3 0, sep_conv_3x3 1 | "
               "sep_conv_3x3 1, skip_connect 0 | skip_connect 0, dil_conv_3x3 2"), [2, 3, 4, 5],
        _pairs("max_pool_3x3 0, max_pool_3x3 1 | skip_connect 2, max_pool_3x3 1 | "
               "max_pool_3x3 0, skip_connect 2 | skip_connect 2, max_pool_3x3 1"), [2, 3, 4, 5]),
    "NASNet": (
        _pairs("sep_conv_5x5 1, sep_conv_3x3 0 | sep_conv_5x5 0, sep_conv_3x3 0 | "
               "avg_pool_3x3 1, skip_connect 0 | avg_pool_3x3 0, avg_pool_3x3 0 | "
               "sep_conv_3x3 1, skip_connect 1"), [2, 3, 4, 5, 6],
        _pairs("sep_conv_5x5 1, sep_conv_7x7 0 | max_pool_3x3 1, sep_conv_7x7 0 | "
               "avg_pool_3x3 1, sep_conv_5x5 0 | skip_connect 3, avg_pool_3x3 2 | "
               "sep_conv_3x3 2, max_pool_3x3 1"), [4, 5, 6]),
    "AmoebaNet": (
        _pairs("avg_pool_3x3 0, max_pool_3x3 1 | sep_conv_3x3 0, sep_conv_5x5 2 | "
               "sep_conv_3x3 0, avg_pool_3x3 3 | sep_conv_3x3 1, skip_connect 1 | "
               "skip_connect 0, avg_pool_3x3 1"), [4, 5, 6],
        _pairs("avg_pool_3x3 0, sep_conv_3x3 1 | max_pool_3x3 0, sep_conv_7x7 2 | "
               "sep_conv_7x7 0, avg_pool_3x3 1 | max_pool_3x3 0, max_pool_3x3 1 | "
               "conv_7x1_1x7 0, sep_conv_3x3 5"), [3, 4, 6]),
}

ATT_DARTS_NORMAL = [
    ("sep_conv_3x3", 0, "DoubleAttention"), ("sep_conv_3x3", 1, "CBAM"),
    ("sep_conv_3x3", 0, "CBAM"), ("skip_connect", 2, "CBAM"),
    ("skip_connect", 0, "CBAM"), ("sep_conv_3x3", 1, "CBAM"),
    ("skip_connect", 0, "CBAM"), ("skip_connect", 2, "CBAM"),
]
ATT_DARTS_REDUCE = [
    ("max_pool_3x3", 0, "BAM"), ("dil_conv_3x3", 1, "DoubleAttention"),
    ("avg_pool_3x3", 0, "BAM"), ("skip_connect", 2, "CBAM"),
    ("skip_connect", 2, "CBAM"), ("avg_pool_3x3", 0, "BAM"),
    ("skip_connect", 2, "CBAM"), ("avg_pool_3x3", 0, "BAM"),
]


def _norm(edges):
    return [tuple(e) if len(e) == 3 else (e[0], e[1], "") for e in edges]


def test_named_genotypes_present():
    assert {"NASNet", "AmoebaNet", "DARTS_V1", "DARTS_V2", "DARTS", "Att_DARTS"} <= set(NAMED_GENOTYPES)
    assert genotypes.DARTS == genotypes.DARTS_V2
    assert NAMED_GENOTYPES["DARTS"] == NAMED_GENOTYPES["DARTS_V2"]


def test_genotype_fields():
    assert Genotype._fields == ("normal", "normal_concat", "reduce", "reduce_concat",
                                "normal_bottleneck", "reduce_bottleneck", "space")
    assert genotypes.DARTS.space == "darts"


def test_att_darts_matches_spec():
    g = genotypes.Att_DARTS
    assert _norm(g.normal) == ATT_DARTS_NORMAL
    assert _norm(g.reduce) == ATT_DARTS_REDUCE
    assert list(g.normal_concat) == [2, 3, 4, 5]
    assert list(g.reduce_concat) == [2, 3, 4, 5]
    assert g.normal_bottleneck == "" and g.reduce_bottleneck == ""


@pytest.mark.parametrize("name", sorted(SPEC_CELLS))
def test_published_darts_cells_match_spec(name):
    normal, normal_concat, reduce_, reduce_concat = SPEC_CELLS[name]
    g = NAMED_GENOTYPES[name]
    assert _norm(g.normal) == normal
    assert _norm(g.reduce) == reduce_
    assert list(g.normal_concat) == normal_concat
    assert list(g.reduce_concat) == reduce_concat
    assert g.normal_bottleneck == "" and g.reduce_bottleneck == ""


@pytest.mark.parametrize("name", sorted(NAMED_GENOTYPES))
def test_json_round_trip(name, tmp_path):
    g = NAMED_GENOTYPES[name]
    path = tmp_path / f"{name}.json"
    save_genotype(g, str(path))
    data = json.loads(path.read_text())
    assert set(data) == set(Genotype._fields) - {"space"}  # darts: written as before spaces
    assert all(len(e) == 3 for e in data["normal"] + data["reduce"])
    loaded = load_genotype(str(path))
    assert isinstance(loaded, Genotype)
    assert _norm(loaded.normal) == _norm(g.normal)
    assert _norm(loaded.reduce) == _norm(g.reduce)
    assert list(loaded.normal_concat) == list(g.normal_concat)
    assert list(loaded.reduce_concat) == list(g.reduce_concat)
    assert loaded.normal_bottleneck == g.normal_bottleneck
    assert loaded.reduce_bottleneck == g.reduce_bottleneck
    # a second round trip is byte-identical
    path2 = tmp_path / "again.json"
    save_genotype(loaded, str(path2))
    assert path2.read_text() == path.read_text()


def test_round_trip_keeps_bottlenecks(tmp_path):
    g = genotypes.Att_DARTS._replace(normal_bottleneck="CBAM", reduce_bottleneck="SE")
    path = tmp_path / "g.json"
    save_genotype(g, str(path))
    loaded = load_genotype(str(path))
    assert (loaded.normal_bottleneck, loaded.reduce_bottleneck) == ("CBAM", "SE")


def _valid_dict():
    return {
        "normal": [list(e) for e in ATT_DARTS_NORMAL],
        "normal_concat": [2, 3, 4, 5],
        "reduce": [list(e) for e in ATT_DARTS_REDUCE],
        "reduce_concat": [2, 3, 4, 5],
        "normal_bottleneck": "",
        "reduce_bottleneck": "",
    }


def _write(tmp_path, data, name="genotype.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_pairs_are_accepted(tmp_path):
    data = _valid_dict()
    data["normal"] = [[op, j] for op, j, _ in ATT_DARTS_NORMAL]
    loaded = load_genotype(str(_write(tmp_path, data)))
    assert _norm(loaded.normal) == [(op, j, "") for op, j, _ in ATT_DARTS_NORMAL]
    assert _norm(loaded.reduce) == ATT_DARTS_REDUCE


def test_pairs_in_a_genotype_are_written_as_triples(tmp_path):
    g = Genotype(normal=[("sep_conv_3x3", 0), ("skip_connect", 1)], normal_concat=[2],
                 reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1)], reduce_concat=[2])
    path = tmp_path / "pairs.json"
    save_genotype(g, str(path))
    data = json.loads(path.read_text())
    assert data["normal"] == [["sep_conv_3x3", 0, ""], ["skip_connect", 1, ""]]
    loaded = load_genotype(str(path))
    assert _norm(loaded.reduce) == [("max_pool_3x3", 0, ""), ("max_pool_3x3", 1, "")]


def test_missing_bottlenecks_mean_empty(tmp_path):
    data = _valid_dict()
    del data["normal_bottleneck"], data["reduce_bottleneck"]
    loaded = load_genotype(str(_write(tmp_path, data)))
    assert loaded.normal_bottleneck == "" and loaded.reduce_bottleneck == ""
    assert _norm(loaded.normal) == ATT_DARTS_NORMAL


def _error(path):
    with pytest.raises(UserError) as info:
        load_genotype(str(path))
    message = str(info.value)
    assert message and "\n" not in message, f"message is not one line: {message!r}"
    assert str(path) in message, f"message does not name the file: {message!r}"
    return message


def test_malformed_json(tmp_path):
    _error(_write(tmp_path, '{"normal": [["sep_conv_3x3", 0, ""],'))


def test_missing_file(tmp_path):
    _error(tmp_path / "nope.json")


def test_not_an_object(tmp_path):
    _error(_write(tmp_path, "[1, 2, 3]"))


@pytest.mark.parametrize("field", ["normal", "normal_concat", "reduce", "reduce_concat"])
def test_missing_field(tmp_path, field):
    data = _valid_dict()
    del data[field]
    assert field in _error(_write(tmp_path, data))


def test_unknown_field(tmp_path):
    data = _valid_dict()
    data["normal_concatt"] = [2, 3]
    assert "normal_concatt" in _error(_write(tmp_path, data))


def test_unknown_op_lists_valid_choices(tmp_path):
    data = _valid_dict()
    data["reduce"][3][0] = "sep_conv_9x9"
    message = _error(_write(tmp_path, data))
    assert "reduce" in message and "sep_conv_9x9" in message
    for valid in ("sep_conv_3x3", "max_pool_3x3", "dil_conv_5x5", "skip_connect"):
        assert valid in message


def test_none_op_is_rejected(tmp_path):
    data = _valid_dict()
    data["normal"][0][0] = "none"
    assert "normal" in _error(_write(tmp_path, data))


def test_unknown_attention_lists_valid_choices(tmp_path):
    data = _valid_dict()
    data["normal"][1][2] = "SEnet"
    message = _error(_write(tmp_path, data))
    assert "normal" in message and "SEnet" in message
    for valid in ("SE", "BAM", "CBAM", "GE_theta-plus", "DoubleAttention", "Identity"):
        assert valid in message


def test_unknown_bottleneck_lists_valid_choices(tmp_path):
    data = _valid_dict()
    data["reduce_bottleneck"] = "Squeeze"
    message = _error(_write(tmp_path, data))
    assert "reduce_bottleneck" in message and "CBAM" in message


@pytest.mark.parametrize("position,index", [(0, 2), (2, 4), (7, 6), (1, -1), (3, "1"), (4, 1.0)])
def test_wrong_input_index(tmp_path, position, index):
    data = _valid_dict()
    data["normal"][position][1] = index
    assert "normal" in _error(_write(tmp_path, data))


@pytest.mark.parametrize("edges", [[], "sep_conv_3x3", [["sep_conv_3x3", 0, ""]],
                                   [["sep_conv_3x3"], ["sep_conv_3x3", 1]],
                                   [["sep_conv_3x3", 0, "", "x"], ["sep_conv_3x3", 1, ""]]])
def test_malformed_edge_list(tmp_path, edges):
    data = _valid_dict()
    data["reduce"] = edges
    assert "reduce" in _error(_write(tmp_path, data))


@pytest.mark.parametrize("concat", [[2, 3, 9], [], "2345", [2, "3"], None, [True, 2]])
def test_bad_concat(tmp_path, concat):
    data = _valid_dict()
    data["reduce_concat"] = concat
    assert "reduce_concat" in _error(_write(tmp_path, data))


def test_resolve_genotype():
    assert genotypes.resolve_genotype("Att_DARTS", None) == genotypes.Att_DARTS
    with pytest.raises(UserError) as info:
        genotypes.resolve_genotype("ATT_DARTS", None)
    assert "\n" not in str(info.value) and "Att_DARTS" in str(info.value)
