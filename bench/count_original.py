"""Count the ATen ops one step of the ORIGINAL release dispatches, in a process of its own.

    python bench/count_original.py search --location after_every --order 2
    python bench/count_original.py train

On a GPU a step is launch-bound, so the number of ops (kernels) a step dispatches is
its cost seen from any machine; the benchmarks print it beside the project's.  The
step is built exactly as ``../shared/baseline/original_step.py`` builds it (same
supernet or final network, same optimizers, same ``Arch.step`` call), from the
modules in the ``original/`` folder beside the stopwatch given by --baseline.  That
stopwatch cannot be imported (it times on import), hence this driver.  One step runs
as a warm-up (optimizer state), then one is counted on the CPU with
``dispatch.OpCounter`` (views and detaches excluded); batches are drawn outside the
counted step.  Prints one JSON line: ``{"ops": N, ...}``.  The original's modules
pick the GPU whenever one is visible: run this with ``CUDA_VISIBLE_DEVICES=""``
(``bench.side_by_side.count_original`` does).
"""
import argparse
import importlib.util
import json
import os
import sys
from argparse import Namespace
from typing import Callable, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("what", choices=["search", "train"])
parser.add_argument("--baseline", default=os.path.join(os.path.dirname(REPO), "shared", "baseline",
                                                       "original_step.py"),
                    help="the original release's stopwatch; its modules are in original/ beside it")
parser.add_argument("--location", default="after_every", help="attention location (search)")
parser.add_argument("--order", type=int, choices=[1, 2], default=2, help="architecture gradient order")
parser.add_argument("--batch", type=int, default=2, help="batch size (counts do not depend on it)")
parser.add_argument("--init_ch", type=int, default=None,
                    help="network width (default: the stopwatch's, 16 for search, 36 for train)")
parser.add_argument("--layers", type=int, default=None,
                    help="cells (default: the stopwatch's, 8 for search, 20 for train)")

Step = Callable[[Tuple], None]


def load_op_counter() -> type:
    """The project's OpCounter, loaded from its file: the project's folder must stay off
    sys.path, where its modules would shadow the original's of the same names."""
    spec = importlib.util.spec_from_file_location("dispatch", os.path.join(REPO, "runtime", "dispatch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OpCounter


def search_step(args: argparse.Namespace, criterion) -> Step:
    """original_step.py's search iteration: Arch.step, then the weight step."""
    import torch
    import torch.nn as nn
    from arch import Arch

    from model_search import AttLocation, Network

    unrolled = args.order == 2
    targs = Namespace(lr=0.025, momentum=0.9, wd=3e-4, grad_clip=5, arch_lr=3e-4, arch_wd=1e-3,
                      init_ch=args.init_ch or 16, layers=args.layers or 8, unrolled=unrolled)
    model = Network(targs.init_ch, 10, targs.layers, criterion, AttLocation(args.location))
    arch_ids = set(map(id, model.arch_and_attn_parameters()))
    optimizer = torch.optim.SGD([q for q in model.parameters() if id(q) not in arch_ids], 0.025,
                                momentum=0.9, weight_decay=3e-4)
    architect = Arch(model, criterion, targs)

    def step(batches: Tuple) -> None:
        (x, y), (xs, ys) = batches
        model.train()
        architect.step(x, y, xs, ys, 0.025, optimizer, unrolled=unrolled)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5)
        optimizer.step()
    return step


def train_step(args: argparse.Namespace, criterion) -> Step:
    """original_step.py's training step: NetworkCIFAR(36, 10, 20, auxiliary, Att_DARTS),
    drop-path 0.2, auxiliary weight 0.4."""
    import torch
    import torch.nn as nn

    import genotypes
    from model import NetworkCIFAR

    model = NetworkCIFAR(args.init_ch or 36, 10, args.layers or 20, True, genotypes.Att_DARTS)
    model.drop_path_prob = 0.2
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)

    def step(batches: Tuple) -> None:
        (x, y), = batches
        model.train()
        logits, aux = model(x)
        loss = criterion(logits, y) + 0.4 * criterion(aux, y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5)
        optimizer.step()
    return step


def main() -> None:
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(args.baseline)), "original"))
    import torch
    import torch.nn as nn

    OpCounter = load_op_counter()
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(1234)
    criterion = nn.CrossEntropyLoss()
    step = (search_step if args.what == "search" else train_step)(args, criterion)

    def batch() -> Tuple:
        return (torch.randn(args.batch, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (args.batch,), generator=generator))

    batches = (batch(), batch()) if args.what == "search" else (batch(),)
    step(batches)
    with OpCounter() as ops:
        step(batches)
    print(json.dumps({"what": args.what, "location": args.location, "order": args.order,
                      "batch": args.batch, "ops": ops.total}))


if __name__ == "__main__":
    main()
