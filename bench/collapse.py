"""Plain DARTS against each published fix of its collapse, side by side on the same seed
and data: short searches in RobustDARTS's stress spaces, printing per epoch how many
skip connections the derived normal cell holds and the dominant Hessian eigenvalue of
the validation loss in architecture space, then each search's final normal cell.

    python bench/collapse.py --data ../shared/data/cifar10-mini     # tiny sizes, CPU, minutes
    python bench/collapse.py --data data --size paper --jobs 4      # the paper's sizes, GPUs

Every search is train_search.py as a user runs it (its own process, ``--hessian_every
1``), all with ``--seed``; the figures are read back from each run's arch_history.jsonl.
The variants are train_search.py's flags of runtime/collapse_fixes.py:

- darts: no fix;
- beta: beta-DARTS, ``--beta_decay 50`` (their release's 50 * epoch / epochs);
- darts-: DARTS-, ``--aux_skip`` (linear decay, as their script);
- fair: FairDARTS, ``--relaxation sigmoid --zero_one_weight 10`` (threshold 0.85);
- sdarts-rs, sdarts-adv: SDARTS, ``--perturb_alpha random`` / ``adversarial``.

``--size tiny`` (the default) searches a 5-cell supernet of width 4 for 8 epochs on
``--images_per_class`` images of each class of DATA/train (a folder of symbolic links
in the output directory), the eigenvalue on 16 images with at most 20 power
iterations (with 5 it never converged): one to three minutes per search on two CPU
cores, enough to show how the searches differ, not what a full search finds.
``--size paper`` is train_search.py's defaults (C=16, 8 cells, batch 64, 50 epochs,
the whole training split) with the eigenvalue on 256 images, as RobustDARTS measures
it: hours per search on a GPU.
``--jobs N`` runs N searches at a time (with N GPUs visible, one GPU each).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from runtime.atomic import atomic_write_text  # noqa: E402

VARIANTS: Dict[str, List[str]] = {
    "darts": [],
    "beta": ["--beta_decay", "50"],
    "darts-": ["--aux_skip"],
    "fair": ["--relaxation", "sigmoid", "--zero_one_weight", "10"],
    "sdarts-rs": ["--perturb_alpha", "random"],
    "sdarts-adv": ["--perturb_alpha", "adversarial"],
}
SIZES: Dict[str, List[str]] = {
    "tiny": ["--init_ch", "4", "--layers", "5", "--batchsz", "16", "--epochs", "8",
             "--hessian_images", "16", "--hessian_iterations", "20", "--workers", "0"],
    "paper": ["--hessian_images", "256", "--hessian_iterations", "20"],
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--data", required=True,
                    help="train_search.py's --data: a folder with train/<class>/ images, or "
                         "torchvision's CIFAR-10 files")
parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="see above")
parser.add_argument("--spaces", nargs="+", default=["s2", "s3"], help="train_search.py --space")
parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
parser.add_argument("--location", default="no_attention",
                    help="train_search.py --location (no_attention: RobustDARTS's own setting; "
                         "any other searches attention as well)")
parser.add_argument("--images_per_class", type=int, default=20,
                    help="--size tiny: images of each class of DATA/train the searches use "
                         "(0: all)")
parser.add_argument("--seed", type=int, default=2, help="the seed of every search")
parser.add_argument("--jobs", type=int, default=1, help="searches at a time")
parser.add_argument("--out", default=os.path.join("exp", "collapse"),
                    help="where the runs, the data subset and results.json go")
parser.add_argument("--extra", default="", help="more train_search.py flags for every search")


def subset(data: str, per_class: int, out: str) -> str:
    """DATA/train's first ``per_class`` images of every class, as symbolic links."""
    source = os.path.join(data, "train")
    if per_class <= 0 or not os.path.isdir(source):
        return data
    target = os.path.join(out, f"data-{per_class}")
    for name in sorted(os.listdir(source)):
        folder = os.path.join(target, "train", name)
        os.makedirs(folder, exist_ok=True)
        for image in sorted(os.listdir(os.path.join(source, name)))[:per_class]:
            link = os.path.join(folder, image)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(source, name, image)), link)
    return target


def run_search(space: str, variant: str, args: argparse.Namespace, data: str,
               gpu: Optional[str]) -> Tuple[str, float, int]:
    """One search to its end: (run directory, seconds, exit code); its output in
    OUT/SPACE/VARIANT/output.txt."""
    exp = os.path.abspath(os.path.join(args.out, space, variant))
    os.makedirs(exp, exist_ok=True)
    command = [sys.executable, os.path.join(REPO, "train_search.py"), "--data", data,
               "--space", space, "--location", args.location, "--seed", str(args.seed),
               "--hessian_every", "1", "--exp_path", exp, *SIZES[args.size],
               *VARIANTS[variant], *args.extra.split()]
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    elif args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    started = time.time()
    with open(os.path.join(exp, "output.txt"), "w") as output:
        returncode = subprocess.call(command, cwd=REPO, env=env, stdout=output,
                                     stderr=subprocess.STDOUT)
    runs = sorted(d for d in os.listdir(exp) if os.path.isdir(os.path.join(exp, d)))
    return (os.path.join(exp, runs[-1]) if runs else exp), time.time() - started, returncode


def read_history(run_dir: str) -> List[Dict]:
    """Per epoch: normal-cell skip connections, the eigenvalue, the genotype."""
    path = os.path.join(run_dir, "arch_history.jsonl")
    if not os.path.exists(path):
        return []
    epochs = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            hessian = record.get("hessian") or {}
            epochs.append({"epoch": record["epoch"],
                           "skip_connect": record["diagnostics"]["skip_connect"]["normal"],
                           "eigenvalue": hessian.get("eigenvalue"),
                           "converged": hessian.get("converged"),
                           "genotype": record["genotype"]})
    return epochs


def visible_gpus() -> List[str]:
    import torch
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def run_all(args: argparse.Namespace, data: str) -> Dict[str, Dict[str, Dict]]:
    """Every (space, variant) search, ``--jobs`` at a time; results by space and variant."""
    gpus = visible_gpus()
    pairs = [(space, variant) for space in args.spaces for variant in args.variants]

    def one(index: int) -> Dict:
        space, variant = pairs[index]
        gpu = gpus[index % len(gpus)] if gpus else None
        run_dir, seconds, returncode = run_search(space, variant, args, data, gpu)
        print(f"{space} {variant}: {'done' if returncode == 0 else f'failed ({returncode})'} in "
              f"{seconds:.0f} s, {run_dir}", flush=True)
        return {"run_dir": run_dir, "seconds": seconds, "returncode": returncode,
                "epochs": read_history(run_dir)}

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, range(len(pairs))))
    table: Dict[str, Dict[str, Dict]] = {space: {} for space in args.spaces}
    for (space, variant), result in zip(pairs, results):
        table[space][variant] = result
    return table


def cell(epoch: Optional[Dict]) -> str:
    if epoch is None:
        return "-"
    value = epoch["eigenvalue"]
    shown = "?" if value is None else f"{value:.3g}{'' if epoch['converged'] else '*'}"
    return f"{epoch['skip_connect']} ({shown})"


def normal_cell(genotype: Dict) -> str:
    return ", ".join(f"{edge[0]}<-{edge[1]}" for edge in genotype["normal"]) or "(no edge)"


def report(table: Dict[str, Dict[str, Dict]], variants: Sequence[str]) -> str:
    """Per space: a row per epoch, a column per variant (normal-cell skip connections,
    the eigenvalue in brackets, * when its power iteration did not converge), then
    each variant's final normal cell and time."""
    lines = []
    for space, results in table.items():
        epochs = max((len(r["epochs"]) for r in results.values()), default=0)
        lines += ["", f"## space {space}: skip connections in the normal cell (dominant "
                      f"Hessian eigenvalue; * not converged)", "",
                  "| epoch | " + " | ".join(variants) + " |",
                  "|--:|" + "--:|" * len(variants)]
        for e in range(epochs):
            row = [cell(results[v]["epochs"][e] if e < len(results[v]["epochs"]) else None)
                   for v in variants]
            lines.append(f"| {e + 1} | " + " | ".join(row) + " |")
        lines += ["", "| variant | final normal cell (op<-input, node by node) | seconds |",
                  "|:--|:--|--:|"]
        for v in variants:
            result = results[v]
            final = (normal_cell(result["epochs"][-1]["genotype"]) if result["epochs"]
                     else f"failed, see {result['run_dir']}")
            lines.append(f"| {v} | {final} | {result['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parser.parse_args()
    # The searches run in the repository: paths given relative to here must not move.
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    data = subset(args.data, args.images_per_class if args.size == "tiny" else 0, args.out)
    started = time.time()
    table = run_all(args, data)
    text = report(table, args.variants)
    print(text)
    results = {"args": vars(args), "seconds": time.time() - started, "table": table}
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=1))
    atomic_write_text(os.path.join(args.out, "results.md"), text.lstrip() + "\n")
    failed = [f"{s} {v}" for s, r in table.items() for v, x in r.items() if x["returncode"]]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their output.txt under {args.out})")


if __name__ == "__main__":
    main()
