"""visualize.py: PDFs for every named genotype and for a genotype.json, edge labels, the
.gv fallback without Graphviz's dot, and one-line errors."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

import visualize  # noqa: E402
from genotypes import NAMED_GENOTYPES, Att_DARTS, save_genotype  # noqa: E402

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's 'dot' program is not installed "
                                      "(e.g. apt-get install graphviz)")


def _command(*args: str) -> list:
    return [sys.executable, str(REPO / "visualize.py"), *args]


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def _headless_env() -> dict:
    """The environment of a machine without a display, where no viewer may be opened."""
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def _assert_pdf(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(b"%PDF"), path
    assert len(data) > 1000, path


@pytest.fixture(scope="module")
def bottleneck_genotype():
    """Att_DARTS with a CBAM bottleneck in the normal cell and a reduction cell given as pairs."""
    return Att_DARTS._replace(normal_bottleneck="CBAM",
                              reduce=[edge[:2] for edge in Att_DARTS.reduce])


@pytest.fixture(scope="module")
def named_runs(tmp_path_factory):
    """Run visualize.py for every named genotype; the runs go in parallel because each
    process spends most of its time importing torch."""
    save_dir = tmp_path_factory.mktemp("named")
    processes = {
        name: subprocess.Popen(_command(name, "--save_dir", str(save_dir), "--without_view"),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in NAMED_GENOTYPES
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = (process.returncode, stdout, stderr)
    return save_dir, results


@needs_dot
@pytest.mark.parametrize("name", list(NAMED_GENOTYPES))
def test_every_named_genotype_draws_both_cells(named_runs, name):
    save_dir, results = named_runs
    returncode, stdout, stderr = results[name]
    assert returncode == 0, stderr
    for cell in ("normal", "reduction"):
        path = save_dir / f"{name}_{cell}.pdf"
        _assert_pdf(path)
        assert str(path) in stdout
    assert not list(save_dir.glob(f"{name}_*.gv")), "the intermediate DOT source is removed"


@needs_dot
def test_json_genotype_draws_headless_without_trying_a_viewer(tmp_path, bottleneck_genotype):
    # No --without_view: with no display the script must still just write the files.
    path = tmp_path / "genotype.json"
    save_genotype(bottleneck_genotype, str(path))
    result = _run(str(path), "--save_dir", str(tmp_path / "out"), env=_headless_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for cell in ("normal", "reduction"):
        _assert_pdf(tmp_path / "out" / f"genotype_{cell}.pdf")


def test_labels_in_dot_source(bottleneck_genotype):
    genotype = bottleneck_genotype
    normal = visualize.cell_graph(genotype.normal, genotype.normal_concat,
                                  genotype.normal_bottleneck).source
    assert '"c_{k-2}" -> 0 [label="sep_conv_3x3 DoubleAttention"]' in normal
    assert '"c_{k-1}" -> 0 [label="sep_conv_3x3 CBAM"]' in normal
    assert "0 -> 1 [label=\"skip_connect CBAM\"]" in normal
    # The bottleneck: concatenated states go to an extra node, then to c_{k} via CBAM.
    assert f'{visualize.CONCAT_NODE} -> "c_{{k}}" [label=CBAM]' in normal
    for state in ("0", "1", "2", "3"):
        assert f"{state} -> {visualize.CONCAT_NODE}\n" in normal

    reduce = visualize.cell_graph(genotype.reduce, genotype.reduce_concat,
                                  genotype.reduce_bottleneck).source
    assert '"c_{k-2}" -> 0 [label=max_pool_3x3]' in reduce  # pairs: just the op
    assert visualize.CONCAT_NODE not in reduce
    assert '3 -> "c_{k}"\n' in reduce


def test_five_node_cell_with_inputs_in_concat():
    nasnet = NAMED_GENOTYPES["NASNet"]
    source = visualize.cell_graph(nasnet.normal, [0, 6], "").source
    assert "\t4 [fillcolor=lightblue]" in source
    assert '"c_{k-2}" -> "c_{k}"\n' in source
    assert '4 -> "c_{k}"\n' in source


@needs_dot
def test_failing_viewer_does_not_lose_the_drawing(tmp_path, monkeypatch, capsys):
    def broken_viewer(path, quiet=False):
        raise FileNotFoundError("xdg-open")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(visualize.graphviz, "view", broken_viewer)
    written = visualize.plot_genotype(Att_DARTS, str(tmp_path), "att", view=True)
    assert written == [str(tmp_path / "att_normal.pdf"), str(tmp_path / "att_reduction.pdf")]
    for path in written:
        _assert_pdf(Path(path))
    assert "could not open a viewer" in capsys.readouterr().err


def test_dot_source_fallback_without_dot(tmp_path, bottleneck_genotype):
    # A PATH holding only python: graphviz cannot find dot, as on a machine without Graphviz.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**_headless_env(), "PATH": str(bin_dir)}
    path = tmp_path / "arch.json"
    save_genotype(bottleneck_genotype, str(path))
    result = _run(str(path), "--save_dir", str(tmp_path / "out"), "--file_name", "cells",
                  "--without_view", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [str(tmp_path / "out" / "cells_normal.gv"),
                         str(tmp_path / "out" / "cells_reduction.gv")]
    assert len(lines) == 3 and "dot -Tpdf FILE.gv -o FILE.pdf" in lines[2]
    assert "apt-get install graphviz" in lines[2]
    normal = (tmp_path / "out" / "cells_normal.gv").read_text()
    assert "sep_conv_3x3 CBAM" in normal and "label=CBAM" in normal
    assert not list((tmp_path / "out").glob("*.pdf"))


def _assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_name_is_a_one_line_error(tmp_path):
    line = _assert_one_line_error(_run("NoSuchNet", "--save_dir", str(tmp_path), "--without_view"))
    assert "NoSuchNet" in line and "Att_DARTS" in line
    assert not list(tmp_path.iterdir())


def test_malformed_json_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"normal": [["sep_conv_3x3", 0, ""]], "normal_concat": [2]')
    line = _assert_one_line_error(_run(str(path), "--save_dir", str(tmp_path), "--without_view"))
    assert str(path) in line
