"""plot_search.py: heatmaps of the architecture-parameter history and the metric curves."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np
import pytest
from PIL import Image

from genotypes import ATTN_PRIMITIVES, PRIMITIVES

EDGES = 14
MIXED = PRIMITIVES + [name for name in ATTN_PRIMITIVES if name != "Identity"]  # 13 candidates


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _history(epochs: int, first: list, second: list = None, gammas: bool = False, seed: int = 0) -> list:
    """Synthetic records shaped like the search script's, weights drifting over epochs."""
    rng = np.random.default_rng(seed)
    drift = {}
    records = []
    for epoch in range(1, epochs + 1):
        arch, candidates = {}, {}
        for cell in ("normal", "reduce"):
            sets = [("alphas", first, (EDGES, len(first)))]
            if second:
                sets.append(("betas", second, (EDGES, len(second))))
            if gammas:
                sets.append(("gammas", ATTN_PRIMITIVES, (len(ATTN_PRIMITIVES),)))
            for prefix, names, shape in sets:
                key = f"{prefix}_{cell}"
                drift.setdefault(key, rng.normal(size=shape))
                arch[key] = _softmax(drift[key] * epoch).tolist()
                candidates[key] = list(names)
        records.append({
            "epoch": epoch, "lr": 0.025 * (1 - epoch / (epochs + 1)),
            "train_acc": 30.0 + 2 * epoch, "train_loss": 2.0 - 0.2 * epoch,
            "valid_acc": 28.0 + 1.5 * epoch, "valid_loss": 2.1 - 0.15 * epoch,
            "genotype": {"normal": [["sep_conv_3x3", 0, "CBAM"]] * 8, "normal_concat": [2, 3, 4, 5],
                         "reduce": [["max_pool_3x3", 1, "SE"]] * 8, "reduce_concat": [2, 3, 4, 5],
                         "normal_bottleneck": "SE" if gammas else "",
                         "reduce_bottleneck": "BAM" if gammas else ""},
            "arch": arch, "candidates": candidates,
        })
    return records


def _write(run_dir: pathlib.Path, records: list) -> pathlib.Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "arch_history.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return run_dir


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "plot_search.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _check_png(path: pathlib.Path) -> None:
    assert path.is_file(), f"missing {path.name}"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width > 200 and height > 200, (path.name, image.size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10, f"{path.name} is (nearly) one colour"


@pytest.mark.parametrize("kind", ["after_every", "after_every_and_end", "mixed_with_operation"])
def test_cli_writes_every_plot(tmp_path, kind):
    if kind == "after_every":
        records, params = _history(3, PRIMITIVES, ATTN_PRIMITIVES), ["alphas", "betas"]
    elif kind == "after_every_and_end":
        records, params = _history(3, PRIMITIVES, ATTN_PRIMITIVES, gammas=True), ["alphas", "betas", "gammas"]
    else:
        records, params = _history(3, MIXED), ["alphas"]
    run_dir = _write(tmp_path / "run", records)
    if kind == "mixed_with_operation":  # also exercise --out_dir
        out = tmp_path / "elsewhere" / "figs"
        result = _run(run_dir, "--out_dir", out)
        assert not (run_dir / "plots").exists()
    else:
        out = run_dir / "plots"
        result = _run(run_dir)
    assert result.returncode == 0, result.stderr
    expected = {f"{p}_{cell}.png" for p in params for cell in ("normal", "reduce")} | {"curves.png"}
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind
    for name in expected:
        _check_png(out / name)


def test_import_api_single_epoch(tmp_path):
    import plot_search

    records = _history(1, PRIMITIVES, ATTN_PRIMITIVES, gammas=True)
    for key in ("alphas_reduce", "betas_reduce", "gammas_reduce", "betas_normal"):
        del records[0]["arch"][key]  # keep one set per shape; missing metrics are allowed
    del records[0]["lr"], records[0]["valid_loss"]
    run_dir = _write(tmp_path / "run", records)
    with open(run_dir / "arch_history.jsonl", "a") as f:
        f.write("\n")  # blank lines are skipped
    history = plot_search.read_history(str(run_dir / "arch_history.jsonl"))
    assert [r["epoch"] for r in history] == [1]
    written = plot_search.plot_history(history, str(tmp_path / "out"))
    assert [pathlib.Path(p).name for p in written] == ["alphas_normal.png", "gammas_normal.png", "curves.png"]
    for path in written:
        _check_png(pathlib.Path(path))


def _assert_user_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


def test_missing_history(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _assert_user_error(_run(run_dir), "arch_history.jsonl")


def test_malformed_line(tmp_path):
    run_dir = _write(tmp_path / "run", _history(2, PRIMITIVES, ATTN_PRIMITIVES))
    with open(run_dir / "arch_history.jsonl", "a") as f:
        f.write('{"epoch": 3, "arch": {\n')
    result = _run(run_dir)
    _assert_user_error(result, "arch_history.jsonl:3")
    assert not (run_dir / "plots").exists() or not any((run_dir / "plots").iterdir())


def test_empty_history(tmp_path):
    import plot_search
    from runtime.errors import UserError

    path = tmp_path / "arch_history.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="arch_history.jsonl"):
        plot_search.read_history(str(path))


def test_inconsistent_shapes_is_user_error(tmp_path):
    import plot_search
    from runtime.errors import UserError

    records = _history(2, PRIMITIVES, ATTN_PRIMITIVES)
    records[1]["arch"]["alphas_normal"] = records[1]["arch"]["alphas_normal"][:5]
    with pytest.raises(UserError, match="alphas_normal"):
        plot_search.plot_history(records, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # checked before anything is drawn
    run_dir = _write(tmp_path / "run", records)
    with pytest.raises(UserError, match=r"arch_history\.jsonl: epoch 2: arch\.alphas_normal"):
        plot_search.read_history(str(run_dir / "arch_history.jsonl"))


def _with_diagnostics(records: list, attention: bool = True, hessian_every: int = 0) -> list:
    """Add the search's per-epoch diagnostics (and eigenvalues every ``hessian_every``
    epochs) to synthetic records: a collapse, skip_connect taking over the normal cell."""
    for number, record in enumerate(records, 1):
        skips = min(8, number)
        entropy = {key: {"mean": 1.0 - 0.1 * number, "min": 1.0 - 0.15 * number}
                   for key in record["arch"]}
        record["diagnostics"] = {
            "parameter_free": {"normal": skips, "reduce": 4}, "skip_connect": {"normal": skips, "reduce": 1},
            "edges": {"normal": 8, "reduce": 8}, "genotype_changed": number % 2 == 1,
            "edges_changed": number % 2, "entropy": entropy,
            "attention": {cell: {"Identity": 8 - skips, "CBAM": skips} for cell in ("normal", "reduce")}
            if attention else {},
        }
        if hessian_every and number % hessian_every == 0:
            record["hessian"] = {"eigenvalue": 0.01 * number ** 2, "images": 256, "iterations": 20,
                                 "converged": True}
    return records


def test_diagnostics_and_attention_plots(tmp_path):
    records = _with_diagnostics(_history(6, MIXED), hessian_every=2)
    records[-1]["early_stop"] = {"epoch": 6, "kept_epoch": 4, "reason": "the eigenvalue grew"}
    run_dir = _write(tmp_path / "run", records)
    result = _run(run_dir)
    assert result.returncode == 0, result.stderr
    out = run_dir / "plots"
    assert {"curves.png", "diagnostics.png", "attention.png"} <= {p.name for p in out.iterdir()}
    assert result.stdout.splitlines()[-2:] == [str(out / "diagnostics.png"), str(out / "attention.png")]
    for name in ("diagnostics.png", "attention.png"):
        _check_png(out / name)


def test_diagnostics_without_edge_attention_or_eigenvalue(tmp_path):
    """A no_attention search: no attention.png; unusable values are left out, not fatal."""
    import plot_search

    records = _with_diagnostics(_history(3, PRIMITIVES), attention=False)
    records[1]["diagnostics"]["parameter_free"]["normal"] = "many"
    del records[2]["diagnostics"]
    written = plot_search.plot_history(records, str(tmp_path / "out"))
    assert [pathlib.Path(p).name for p in written[-2:]] == ["curves.png", "diagnostics.png"]
    _check_png(tmp_path / "out" / "diagnostics.png")
