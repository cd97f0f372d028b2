"""The architecture step of the bilevel search.

First order:  grad_A L_val(w, A).
Second order: grad_A L_val(w', A) - xi * [grad_A L_train(w+, A) - grad_A L_train(w-, A)] / (2 eps)
with the virtual step w' = w - xi (mu m + grad_w L_train(w, A) + lambda w) taken
exactly as the weight optimizer would (its momentum buffers and weight decay),
w+- = w +- eps v, v = grad_w' L_val(w', A), eps = 0.01 / |v|.

Everything runs through ``torch.func.functional_call`` on the one network: no
copy of the model is built per step.  The architecture parameters are never in
the weight optimizer, never moved by the virtual step, never perturbed.  BN
running statistics are those of the weight step: these forwards normalise with
batch statistics and leave the running ones alone.  Under torchrun every gradient
is averaged over processes and the new A is broadcast from rank 0, so all ranks
hold bit-identical A.
The step runs in float32 whatever ``--amp`` says (see ``_loss``), and the second
order's passes in IEEE float32 on CUDA, not TF32 (``precision.exact_float32``).
A ``variant`` (runtime/collapse_fixes.py) adds the gradient of its penalty on A (beta-DARTS's
Beta-Decay, FairDARTS's zero-one loss) to either order's gradient.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from model_search import Network
from runtime.collapse_fixes import Variant
from runtime.parallel import all_reduce_mean_, broadcast_, unwrap
from runtime.precision import exact_float32
from runtime.recompute import batch_norms, batch_statistics_only

Tensors = Dict[str, torch.Tensor]


class Architect:
    def __init__(self, model: nn.Module, weight_optimizer: torch.optim.SGD, arch_lr: float,
                 arch_wd: float, unrolled: bool, capturable: bool = False,
                 variant: Optional[Variant] = None, grad_clip: float = 0.0):
        """``model``: the supernet, bare or wrapped in DataParallel/DDP.  ``capturable``:
        Adam keeps its step count on the device, so that a CUDA graph can hold the step
        (CUDA only; on the CPU the count is a host number anyway).  ``variant``: the
        collapse fixes of the search (runtime/collapse_fixes.py), if any.  ``grad_clip`` > 0:
        the architecture gradient's norm is clipped to it before each step (PC-DARTS's
        ImageNet search)."""
        # functional_call needs the bare network: PyTorch refuses it on DataParallel,
        # and DDP's forward would synchronise buffers.  Under torchrun each process
        # runs this step on its own shard and the gradients are averaged here; with
        # DataParallel the architecture step runs on the first GPU.
        self.network: Network = unwrap(model)
        self.norms = batch_norms(self.network)
        self.weight_optimizer = weight_optimizer
        self.unrolled = unrolled
        self.variant = variant
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.Adam(self.network.arch_parameters(), lr=arch_lr,
                                          betas=(0.5, 0.999), weight_decay=arch_wd, foreach=True,
                                          capturable=capturable)

    # -- functional forward -------------------------------------------------------
    def _loss(self, weights: Tensors, arch: Tensors, x: torch.Tensor,
              target: torch.Tensor) -> torch.Tensor:
        # Always float32, even inside an autocast region (--amp): measured on small
        # supernets, bfloat16 forwards put the architecture gradient 13-25% off the
        # float32 one and wash out the finite difference (w +- eps v rounds back to w).
        # BN running statistics are those of the weight step: these forwards leave
        # them alone.
        with torch.autocast(x.device.type, enabled=False), batch_statistics_only(self.norms):
            return self.network.loss(x, target, {**weights, **arch})

    @staticmethod
    def _grad(loss: torch.Tensor, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        # On the CPU, backward runs in the caller's autocast state: without this, a
        # step called inside an autocast region would multiply its Linear and bmm
        # gradients in bfloat16 (4.6% off the float32 hypergradient, measured).
        with torch.autocast(loss.device.type, enabled=False):
            return list(torch.autograd.grad(loss, inputs))

    def _current(self) -> Tuple[Tensors, Tensors]:
        return dict(self.network.named_weights()), self.network.named_arch_parameters()

    # -- gradients ------------------------------------------------------------------
    def first_order_gradient(self, x_valid: torch.Tensor, y_valid: torch.Tensor) -> List[torch.Tensor]:
        """grad_A L_val(w, A) (weights detached: no weight gradients are computed)."""
        weights, arch = self._current()
        detached = {k: w.detach() for k, w in weights.items()}
        loss = self._loss(detached, arch, x_valid, y_valid)
        grads = self._grad(loss, list(arch.values()))
        all_reduce_mean_(grads)
        return grads

    @torch.no_grad()
    def virtual_weights(self, weights: Tensors, train_grads: List[torch.Tensor], lr: float) -> Tensors:
        """w' = w - xi (mu m + g + lambda w), with the SGD optimizer's own momentum
        buffers (zero before its first step) and weight decay.  One ``_foreach`` op per
        term for all weights: on a GPU a per-weight loop is hundreds of tiny kernels."""
        group = self.weight_optimizer.param_groups[0]
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        params = list(weights.values())
        steps = torch._foreach_add(train_grads, params, alpha=weight_decay)
        buffers = [self.weight_optimizer.state.get(w, {}).get("momentum_buffer") for w in params]
        with_buffer = [i for i, b in enumerate(buffers) if b is not None]
        if with_buffer:  # none before the optimizer's first step
            torch._foreach_add_([steps[i] for i in with_buffer], [buffers[i] for i in with_buffer],
                                alpha=momentum)
        virtual = torch._foreach_add(params, steps, alpha=-lr)
        return {name: v.requires_grad_(True) for name, v in zip(weights, virtual)}

    def second_order_gradient(self, x_train: torch.Tensor, y_train: torch.Tensor,
                              x_valid: torch.Tensor, y_valid: torch.Tensor,
                              lr: float) -> List[torch.Tensor]:
        # In IEEE float32 on CUDA, not TF32: TF32 rounds the virtual step and the
        # perturbation eps v away (see precision.exact_float32); the weight step may
        # use TF32.
        with exact_float32():
            return self._second_order_gradient(x_train, y_train, x_valid, y_valid, lr)

    def _second_order_gradient(self, x_train: torch.Tensor, y_train: torch.Tensor,
                               x_valid: torch.Tensor, y_valid: torch.Tensor,
                               lr: float) -> List[torch.Tensor]:
        weights, arch = self._current()
        frozen_arch = {k: a.detach() for k, a in arch.items()}

        # Virtual step from the training loss (weight gradients only).
        loss = self._loss(weights, frozen_arch, x_train, y_train)
        train_grads = self._grad(loss, list(weights.values()))
        all_reduce_mean_(train_grads)
        virtual = self.virtual_weights(weights, train_grads, lr)
        del train_grads

        # Validation loss at w': gradients for A and for w' (the Hessian direction).
        loss = self._loss(virtual, arch, x_valid, y_valid)
        grads = self._grad(loss, list(arch.values()) + list(virtual.values()))
        arch_grads, direction = grads[:len(arch)], grads[len(arch):]
        all_reduce_mean_(grads)
        del virtual, grads

        hessian_term = self.hessian_vector_product(weights, arch, direction, x_train, y_train)
        return list(torch._foreach_add(arch_grads, hessian_term, alpha=-lr))

    def hessian_vector_product(self, weights: Tensors, arch: Tensors,
                               direction: List[torch.Tensor], x: torch.Tensor,
                               target: torch.Tensor) -> List[torch.Tensor]:
        """(grad_A L_train(w + eps v, A) - grad_A L_train(w - eps v, A)) / (2 eps)
        ~ d^2 L_train / dA dw . v, with eps = 0.01 / |v|."""
        # A tensor, never read back: the step stays free of host synchronisation.
        eps = 0.01 / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction)))
        params = list(weights.values())
        with torch.no_grad():
            scaled = torch._foreach_mul(direction, eps)
            plus = dict(zip(weights, torch._foreach_add(params, scaled)))
        grads_plus = self._grad(self._loss(plus, arch, x, target), list(arch.values()))
        del plus
        with torch.no_grad():
            minus = dict(zip(weights, torch._foreach_sub(params, scaled)))
        del scaled
        grads_minus = self._grad(self._loss(minus, arch, x, target), list(arch.values()))
        del minus
        difference = torch._foreach_sub(grads_plus, grads_minus)
        all_reduce_mean_(difference)
        return list(torch._foreach_div(difference, 2 * eps))

    # -- the step -------------------------------------------------------------------
    def architecture_gradient(self, x_train: torch.Tensor, y_train: torch.Tensor,
                              x_valid: torch.Tensor, y_valid: torch.Tensor,
                              lr: float) -> List[torch.Tensor]:
        """The gradient the step applies: first or second order, plus the variant's
        penalty's (it depends on A alone, the same on every process)."""
        if self.unrolled:
            grads = self.second_order_gradient(x_train, y_train, x_valid, y_valid, lr)
        else:
            grads = self.first_order_gradient(x_valid, y_valid)
        arch = self.network.named_arch_parameters()
        with torch.autocast(x_valid.device.type, enabled=False):
            penalty = self.variant.penalty(arch) if self.variant is not None else None
            if penalty is None:
                return grads
            # PC-DARTS's edge weights take no part in a penalty: zero gradients for them.
            penalty_grads = torch.autograd.grad(penalty, list(arch.values()), allow_unused=True,
                                                materialize_grads=True)
        return list(torch._foreach_add(grads, penalty_grads))

    def step(self, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor,
             y_valid: torch.Tensor, lr: float) -> None:
        """One Adam step on A.  ``lr`` is the weight optimizer's current learning rate."""
        grads = self.architecture_gradient(x_train, y_train, x_valid, y_valid, lr)
        for param, grad in zip(self.network.arch_parameters(), grads):
            param.grad = grad
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.network.arch_parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        broadcast_(self.network.arch_parameters())
