"""The published fixes of DARTS's collapse, opt-in flags of train_search.py, each as
its authors' release computes it (tests/test_collapse_fixes_reference.py writes each
release's computation out and compares):

- beta-DARTS (Ye et al., CVPR 2022), ``--beta_decay LAMBDA``: the architecture loss
  gains lambda_e * mean over rows of logsumexp(raw row), lambda_e = LAMBDA * e / E at
  epoch e (from 0) of E (their ``50 * epoch / 100``: LAMBDA 50 over 100 epochs).  Each
  family of candidate weights (operation alphas, attention betas, cell-end gammas;
  normal and reduction rows together) gets its own mean: the alphas' term is theirs.
- DARTS- (Chu et al., ICLR 2021), ``--aux_skip``: every edge's operations gain an
  auxiliary skip connection weighted by a rate outside the softmax, decayed per epoch
  (``--aux_skip_decay``: linear (E - e) / E as their published script, cosine
  (1 + cos(pi e / E)) / 2, or constant 1); the genotype never shows it
  (``model_search.MixedOp``).
- FairDARTS (Chu et al., ECCV 2020), ``--relaxation sigmoid``: independent sigmoids
  instead of the softmax, ``--zero_one_weight W``: the architecture loss gains
  -W * mean((sigmoid - 0.5)^2) per family (`none` left out: their space has none),
  and the cell is derived by their threshold (``--op_threshold``, model_search.py).
- SDARTS (Chen and Hsieh, ICML 2020), ``--perturb_alpha random|adversarial``: the
  weight step runs on softmax(alpha) perturbed within an L-inf ball of radius
  eps_e = 0.03 + (EPS - 0.03) * e / E (``--perturb_epsilon EPS``) and clipped back to
  the simplex row by row; the architecture step sees the clean alpha.  Random: uniform
  noise.  Adversarial: 7 PGD steps of sign ascent on the weight step's own batch
  (network in eval mode), reverted when they did not raise the loss.  The noise is
  drawn from the device's default generator (the same seed on every process; its
  state is in the checkpoint), and no step reads a tensor back to the host.
"""
import argparse
import contextlib
import math
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from model_search import EDGE_WEIGHTS, RELAXATIONS, Network
from runtime.errors import UserError
from runtime.parallel import all_reduce_mean_

AUX_SKIP_DECAYS = ("linear", "cosine", "constant")
PERTURBATIONS = ("none", "random", "adversarial")
# SDARTS: the radius at epoch 0, and the PGD steps of the adversarial perturbation.
EPSILON_START = 0.03
PGD_STEPS = 7
# What a checkpoint written before these flags existed was searched with.
EARLIER_FLAGS = {"beta_decay": 0.0, "aux_skip": False, "aux_skip_decay": "linear",
                 "relaxation": "softmax", "zero_one_weight": 0.0, "op_threshold": 0.85,
                 "perturb_alpha": "none", "perturb_epsilon": 0.3}


def add_variant_flags(parser: argparse.ArgumentParser) -> None:
    """train_search.py's flags of the published fixes of collapse."""
    parser.add_argument("--beta_decay", type=float, default=0.0, metavar="LAMBDA",
                        help="beta-DARTS's Beta-Decay regularisation of the architecture loss, "
                             "weighted LAMBDA * epoch / epochs (their release: 50 over 100 "
                             "epochs); it decays the operation alphas and the attention "
                             "alphas (betas, gammas) alike; 0: off")
    parser.add_argument("--aux_skip", action="store_true",
                        help="DARTS-'s auxiliary skip connection on every edge, outside the "
                             "softmax, its weight decayed over the search (--aux_skip_decay); "
                             "never part of the genotype")
    parser.add_argument("--aux_skip_decay", choices=AUX_SKIP_DECAYS, default="linear",
                        help="--aux_skip's weight at epoch e of E: (E - e) / E, "
                             "(1 + cos(pi e / E)) / 2, or 1")
    parser.add_argument("--relaxation", choices=RELAXATIONS, default="softmax",
                        help="how the architecture weighs an edge's candidates: DARTS's softmax, "
                             "or FairDARTS's independent sigmoids (then the cell is derived by "
                             "--op_threshold)")
    parser.add_argument("--zero_one_weight", type=float, default=0.0, metavar="W",
                        help="FairDARTS's zero-one loss: the architecture loss gains "
                             "-W * mean((sigmoid(alpha) - 0.5)^2) (their release: 10; needs "
                             "--relaxation sigmoid); 0: off")
    parser.add_argument("--op_threshold", type=float, default=0.85, metavar="T",
                        help="--relaxation sigmoid: a kept edge (two strongest per node) stays "
                             "only if its operation's sigmoid reaches this, as FairDARTS "
                             "derives its cells; a node may keep fewer than two edges")
    parser.add_argument("--perturb_alpha", choices=PERTURBATIONS, default="none",
                        help="SDARTS: the weight step runs on softmax(alpha) perturbed by "
                             "uniform noise (random) or by 7 PGD steps (adversarial)")
    parser.add_argument("--perturb_epsilon", type=float, default=0.3, metavar="EPS",
                        help="--perturb_alpha's radius, 0.03 at the first epoch growing linearly "
                             "towards EPS (SDARTS: 0.3)")


def check_variant_flags(args: argparse.Namespace) -> None:
    """Bad values and combinations, one line each, before any work."""
    for flag in ("beta_decay", "zero_one_weight"):
        if getattr(args, flag) < 0 or not math.isfinite(getattr(args, flag)):
            raise UserError(f"--{flag} must be a finite weight >= 0 (0: off), got {getattr(args, flag)}")
    if not 0 < args.op_threshold <= 1:
        raise UserError(f"--op_threshold must be in (0, 1] (a sigmoid weight), got {args.op_threshold}")
    if not 0 < args.perturb_epsilon < math.inf:
        raise UserError(f"--perturb_epsilon must be a positive radius, got {args.perturb_epsilon}")
    sigmoid = args.relaxation == "sigmoid"
    orphans = {"op_threshold": (not sigmoid, "--relaxation sigmoid"),
               "aux_skip_decay": (not args.aux_skip, "--aux_skip"),
               "perturb_epsilon": (args.perturb_alpha == "none", "--perturb_alpha")}
    for flag, (unused, owner) in orphans.items():
        if unused and getattr(args, flag) != EARLIER_FLAGS[flag]:
            raise UserError(f"--{flag} is a setting of {owner}, which is not given: give it as "
                            f"well, or leave --{flag} out")
    if args.zero_one_weight and not sigmoid:
        raise UserError("--zero_one_weight pushes sigmoid weights to 0 or 1: give --relaxation "
                        "sigmoid as well (FairDARTS)")
    if sigmoid and args.beta_decay:
        raise UserError("--beta_decay regularises the softmax's normaliser, which --relaxation "
                        "sigmoid does not have: use one of the two")
    if sigmoid and args.perturb_alpha != "none":
        raise UserError("--perturb_alpha perturbs softmax(alpha) on the simplex (SDARTS), which "
                        "--relaxation sigmoid does not use: use one of the two")


def describe(args: argparse.Namespace) -> str:
    """The fixes a search runs with, in words (log.txt, the result card)."""
    parts = []
    if args.beta_decay:
        parts.append(f"beta-DARTS (--beta_decay {args.beta_decay:g})")
    if args.aux_skip:
        parts.append(f"DARTS- (--aux_skip, {args.aux_skip_decay} decay)")
    if args.relaxation == "sigmoid":
        parts.append(f"FairDARTS (sigmoid relaxation, --zero_one_weight {args.zero_one_weight:g}, "
                     f"--op_threshold {args.op_threshold:g})")
    if args.perturb_alpha != "none":
        parts.append(f"SDARTS-{'RS' if args.perturb_alpha == 'random' else 'ADV'} "
                     f"(--perturb_epsilon {args.perturb_epsilon:g})")
    return " + ".join(parts) or "plain DARTS (no collapse fix)"


def describe_command_line(argv: List[str]) -> str:
    """``describe`` for train_search.py's command-line flags ``argv`` (others ignored)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_variant_flags(parser)
    try:
        return describe(parser.parse_known_args(argv)[0])
    except argparse.ArgumentError as error:
        return f"unreadable collapse-fix flags ({error})"


# -- the schedules, by epoch (from 0) of ``epochs`` ---------------------------------------

def beta_decay_weight(beta_decay: float, epoch: int, epochs: int) -> float:
    return beta_decay * epoch / epochs


def aux_skip_rate(decay: str, epoch: int, epochs: int) -> float:
    if decay == "linear":
        return (epochs - epoch) / epochs
    if decay == "cosine":
        return (1 + math.cos(math.pi * epoch / epochs)) / 2
    return 1.0


def perturb_epsilon(epsilon: float, epoch: int, epochs: int) -> float:
    return EPSILON_START + (epsilon - EPSILON_START) * epoch / epochs


# -- the computations ---------------------------------------------------------------------

def candidate_families(network: Network) -> Dict[str, List[str]]:
    """The architecture parameters that weigh candidates (not PC-DARTS's edge
    weights), by family: alphas, betas, gammas, each [normal, reduce]."""
    families: Dict[str, List[str]] = {}
    for name in network.named_arch_parameters():
        if not name.startswith(EDGE_WEIGHTS):
            families.setdefault(name.rsplit("_", 1)[0], []).append(name)
    return families


def beta_decay_loss(network: Network, arch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """beta-DARTS's ``mlc_loss``: per family, the mean over its rows of
    logsumexp(raw row); summed over families."""
    return sum(torch.cat([arch[n].reshape(-1, arch[n].shape[-1]) for n in names])
               .logsumexp(dim=-1).mean() for names in candidate_families(network).values())


def zero_one_loss(network: Network, arch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """FairDARTS's ``-F.mse_loss(sigmoid(alphas), 0.5)`` per family, over the columns of
    its candidates other than `none`; summed over families."""
    stages = {"alphas": network.space.first_stage, "betas": network.space.second_stage,
              "gammas": network.space.cell_end}
    total = 0
    for family, names in candidate_families(network).items():
        rows = torch.sigmoid(torch.cat([arch[n].reshape(-1, arch[n].shape[-1]) for n in names]))
        # Column slices, not an index list: that would be a host-to-device copy per step.
        weights = torch.cat([rows[:, k:k + 1] for k, name in enumerate(stages[family])
                             if name != "none"], dim=1)
        total = total - F.mse_loss(weights, torch.full_like(weights, 0.5))
    return total


def clip_rows(weights: torch.Tensor) -> torch.Tensor:
    """SDARTS's ``clip()``, row by row: clamp to [0, 1]; a row left all zero becomes
    one-hot at its argmax (taken before the clamp); divide by the row's sum."""
    best = weights.argmax(dim=-1, keepdim=True)
    clamped = weights.clamp(0, 1)
    one_hot = torch.zeros_like(weights).scatter_(-1, best, 1.0)
    clamped = torch.where(clamped.sum(dim=-1, keepdim=True) == 0, one_hot, clamped)
    return clamped / clamped.sum(dim=-1, keepdim=True)


class Variant:
    """What the fixes add to a search iteration at the current epoch (``start_epoch``
    sets the schedules): a penalty on the architecture loss, and the perturbed
    architecture of the weight step."""

    def __init__(self, args: argparse.Namespace, network: Network):
        self.network = network
        self.beta_decay, self.zero_one_weight = args.beta_decay, args.zero_one_weight
        self.aux_skip_decay = args.aux_skip_decay if args.aux_skip else None
        self.perturbation, self.epsilon_max = args.perturb_alpha, args.perturb_epsilon
        self.epochs = args.epochs
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> str:
        """The schedules' values at ``epoch`` (from 0): read by the steps (a CUDA graph
        is captured anew every epoch) and, for the auxiliary skip, by every forward.
        Returns them in words ('' when nothing is scheduled)."""
        self.beta_weight = beta_decay_weight(self.beta_decay, epoch, self.epochs)
        self.epsilon = perturb_epsilon(self.epsilon_max, epoch, self.epochs)
        said = []
        if self.beta_decay:
            said.append(f"Beta-Decay weight {self.beta_weight:.6g}")
        if self.aux_skip_decay is not None:
            rate = aux_skip_rate(self.aux_skip_decay, epoch, self.epochs)
            self.network.aux_skip_rate.fill_(rate)
            said.append(f"auxiliary skip weight {rate:.6g}")
        if self.perturbation != "none":
            said.append(f"perturbation radius {self.epsilon:.6g}")
        return ", ".join(said)

    def penalty(self, arch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The architecture loss's regularisers at ``arch`` (name -> raw parameter), or
        None when there are none."""
        terms = []
        if self.beta_decay:
            terms.append(self.beta_weight * beta_decay_loss(self.network, arch))
        if self.zero_one_weight:
            terms.append(self.zero_one_weight * zero_one_loss(self.network, arch))
        return sum(terms) if terms else None

    @contextlib.contextmanager
    def perturbed(self, images: torch.Tensor, targets: torch.Tensor) -> Iterator[None]:
        """Within this block the network weighs its candidates with SDARTS's perturbed
        softmax (``images``, ``targets``: the weight step's batch, which ADV attacks)."""
        if self.perturbation == "none":
            yield
            return
        network = self.network
        with torch.no_grad():
            clean = {name: network.relaxed(name).detach() for name in network.named_arch_parameters()}
        names = [name for names in candidate_families(network).values() for name in names]
        if self.perturbation == "random":
            weights = {name: self._random_start(clean[name]) for name in names}
        else:
            weights = self._adversarial(clean, names, images, targets)
        with network.holding_relaxed({**clean, **weights}):
            yield

    def _random_start(self, weights: torch.Tensor) -> torch.Tensor:
        noise = torch.zeros_like(weights).uniform_(-self.epsilon, self.epsilon)
        return clip_rows(weights + noise)

    def _adversarial(self, clean: Dict[str, torch.Tensor], names: List[str], images: torch.Tensor,
                     targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """SDARTS's ``Linf_PGD_alpha``: random start, ``PGD_STEPS`` steps of
        ``2 eps / steps`` times the sign of the loss's gradient, each projected back into
        the eps-ball around the clean weights and clipped; the clean weights again if
        the loss ended lower than it began.  Gradients and losses are averaged over
        torchrun's processes, so every process holds the same perturbation."""
        network, epsilon = self.network, self.epsilon
        weights = {name: w.detach() for name, w in network.named_weights()}

        def loss(arch: Dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.autocast(images.device.type, enabled=False), network.holding_relaxed():
                return network.loss(images, targets, {**weights, **clean, **arch})

        training = network.training
        network.eval()  # as their attack: BatchNorm on its running statistics
        try:
            with torch.no_grad():
                before = loss({})
            perturbed = {name: self._random_start(clean[name]) for name in names}
            for _ in range(PGD_STEPS):
                inputs = {name: w.requires_grad_(True) for name, w in perturbed.items()}
                with torch.autocast(images.device.type, enabled=False):
                    grads = list(torch.autograd.grad(loss(inputs), list(inputs.values())))
                all_reduce_mean_(grads)
                with torch.no_grad():
                    perturbed = {name: clip_rows(clean[name] + (w + 2 * epsilon / PGD_STEPS * g.sign()
                                                                - clean[name]).clamp(-epsilon, epsilon))
                                 for (name, w), g in zip(inputs.items(), grads)}
            with torch.no_grad():
                after = loss(perturbed)
            losses = torch.stack([before, after])
            all_reduce_mean_([losses])
            worse = losses[0] > losses[1]
            return {name: torch.where(worse, clean[name], w) for name, w in perturbed.items()}
        finally:
            network.train(training)
