"""Small shared helpers: genotype files, checkpoints, metrics, atomic writes, errors."""
import json
import os
import random
import sys
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from attentions import ATTENTIONS
from genotypes import NAMED_GENOTYPES, Genotype
from operations import OPS


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, mismatched checkpoint).

    Scripts print it as one line and exit with a non-zero code (see ``run_cli``)."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes one line on stderr and exit 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -- atomic output ---------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a killed run never leaves half a file."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(path, write)


# -- genotypes -------------------------------------------------------------------

GENOTYPE_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat",
                   "normal_bottleneck", "reduce_bottleneck")
FIRST_ELEMENTS = [name for name in OPS if name != "none"] + list(ATTENTIONS)
SECOND_ELEMENTS = [""] + list(ATTENTIONS) + [name for name in OPS if name != "none"]
BOTTLENECKS = [""] + list(ATTENTIONS)


def genotype_to_dict(genotype: Genotype) -> Dict[str, Any]:
    """The JSON form of a genotype; pairs gain '' as their attention."""
    def triples(edges):
        return [[edge[0], int(edge[1]), edge[2] if len(edge) > 2 else ""] for edge in edges]
    return {
        "normal": triples(genotype.normal),
        "normal_concat": list(genotype.normal_concat),
        "reduce": triples(genotype.reduce),
        "reduce_concat": list(genotype.reduce_concat),
        "normal_bottleneck": genotype.normal_bottleneck or "",
        "reduce_bottleneck": genotype.reduce_bottleneck or "",
    }


def save_genotype(genotype: Genotype, path: str) -> None:
    atomic_write_text(path, json.dumps(genotype_to_dict(genotype), indent=2) + "\n")


def _check_choice(value: Any, valid: Sequence[str], where: str, what: str) -> str:
    if not isinstance(value, str) or value not in valid:
        shown = ", ".join(repr(v) for v in valid)
        raise UserError(f"{where}: unknown {what} {value!r}; valid: {shown}")
    return value


def _parse_edges(value: Any, where: str) -> List[Tuple[str, int, str]]:
    if not isinstance(value, list) or len(value) < 2 or len(value) % 2:
        raise UserError(f"{where}: expected a list of an even number of [op, input, attention] "
                        f"entries (two per node), got {value!r}")
    edges = []
    for position, edge in enumerate(value):
        here = f"{where}[{position}]"
        if not isinstance(edge, (list, tuple)) or len(edge) not in (2, 3):
            raise UserError(f"{here}: expected [op, input index] or [op, input index, attention], "
                            f"got {edge!r}")
        op = _check_choice(edge[0], FIRST_ELEMENTS, here, "operation")
        index = edge[1]
        node = position // 2
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < node + 2:
            raise UserError(f"{here}: input index {index!r} is invalid for node {node}; "
                            f"valid: 0..{node + 1} (0, 1: cell inputs, k >= 2: node k-2)")
        attention = edge[2] if len(edge) == 3 else ""
        attention = _check_choice(attention, SECOND_ELEMENTS, here, "attention")
        edges.append((op, index, attention))
    return edges


def _parse_concat(value: Any, num_nodes: int, where: str) -> List[int]:
    valid = range(num_nodes + 2)
    if (not isinstance(value, list) or not value
            or any(isinstance(i, bool) or not isinstance(i, int) or i not in valid for i in value)):
        raise UserError(f"{where}: expected a non-empty list of state indices in "
                        f"0..{num_nodes + 1}, got {value!r}")
    return list(value)


def genotype_from_dict(data: Any, source: str = "genotype") -> Genotype:
    """Validate and build a genotype from its JSON form; errors name the source and field."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with fields {', '.join(GENOTYPE_FIELDS)}")
    unknown = sorted(set(data) - set(GENOTYPE_FIELDS))
    if unknown:
        raise UserError(f"{source}: unknown field {unknown[0]!r}; valid: {', '.join(GENOTYPE_FIELDS)}")
    fields: Dict[str, Any] = {}
    for kind in ("normal", "reduce"):
        for key in (kind, f"{kind}_concat"):
            if key not in data:
                raise UserError(f"{source}: missing field {key!r}")
        edges = _parse_edges(data[kind], f"{source}: field {kind!r}")
        fields[kind] = edges
        fields[f"{kind}_concat"] = _parse_concat(data[f"{kind}_concat"], len(edges) // 2,
                                                 f"{source}: field '{kind}_concat'")
        fields[f"{kind}_bottleneck"] = _check_choice(
            data.get(f"{kind}_bottleneck", ""), BOTTLENECKS,
            f"{source}: field '{kind}_bottleneck'", "attention")
    return Genotype(**fields)


def load_genotype(path: str) -> Genotype:
    """Read a ``genotype.json`` (SPEC §4), with one-line errors naming file and field."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise UserError(f"cannot read genotype file {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    return genotype_from_dict(data, path)


def resolve_genotype(arch: Optional[str], arch_path: Optional[str]) -> Genotype:
    """``--arch_path`` (a JSON file) wins over ``--arch`` (a name in genotypes.py)."""
    if arch_path:
        return load_genotype(arch_path)
    if arch not in NAMED_GENOTYPES:
        raise UserError(f"unknown --arch {arch!r}; valid: {', '.join(NAMED_GENOTYPES)} "
                        f"(or give a genotype.json with --arch_path)")
    return NAMED_GENOTYPES[arch]


# -- checkpoints -----------------------------------------------------------------

def load_torch_file(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        if "Weights only load failed" in str(error):
            reason = "it holds Python objects besides tensors, which are not loaded for safety"
        else:
            reason = "not a file written by torch.save"
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {reason}") from None


def extract_state_dict(checkpoint: Any, path: str) -> Dict[str, torch.Tensor]:
    """A model ``state_dict`` from a bare one, one inside ``{"state_dict": ...}``, or one
    whose keys carry DataParallel's ``module.`` prefix."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if (not isinstance(checkpoint, Mapping) or not checkpoint
            or not all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
        raise UserError(f"{path} holds no model state_dict")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a published-layout checkpoint into ``model``; a mismatch names the first
    key that differs."""
    state = extract_state_dict(load_torch_file(path), path)
    check_state_dict_fits(model, state, path)
    model.load_state_dict(state)


def check_state_dict_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UserError(f"{path} does not fit the architecture: missing key {key!r} "
                            f"(check --arch/--arch_path, --init_ch, --layers, --auxiliary)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{path} does not fit the architecture: {key!r} has shape "
                            f"{tuple(state[key].shape)}, the model expects {tuple(tensor.shape)} "
                            f"(check --arch/--arch_path, --init_ch, --layers)")
    for key in state:
        if key not in expected:
            raise UserError(f"{path} does not fit the architecture: unexpected key {key!r} "
                            f"(check --arch/--arch_path, --auxiliary, --layers)")


# -- metrics ---------------------------------------------------------------------

def count_parameters_in_MB(model: nn.Module) -> float:
    """Parameters in millions, auxiliary head excluded (as papers report them)."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name) / 1e6


def topk_correct(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> torch.Tensor:
    """How many samples have their target among the top-k predictions, per k: exact
    integer counts (sums over batches and processes stay exact), left on the device."""
    maxk = min(max(topk), output.size(1))
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.eq(target.view(-1, 1))
    return torch.stack([correct[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> List[float]:
    """Top-k accuracies of one batch, in percent."""
    return (topk_correct(output, target, topk).double() * 100.0 / target.size(0)).tolist()


class AverageMeter:
    """Running average of a metric weighted by sample counts."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n
        self.avg = self.sum / self.count


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Every RNG the runs use, for resumable checkpoints."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    # Plain Python values and tensors only, so checkpoints load with weights_only=True.
    state = {"python": random.getstate(),
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
