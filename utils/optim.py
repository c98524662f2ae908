"""Adam as the authors' PyTorch 0.3 computed it, next to today's ``torch.optim.Adam``.

With the gradient ``g_t`` (plus ``weight_decay · θ`` when weight decay is set), both keep
``m_t = β1·m_{t-1} + (1-β1)·g_t`` and ``v_t = β2·v_{t-1} + (1-β2)·g_t²``. They differ in
where ε enters:

* PyTorch 0.3: ``θ -= lr · sqrt(1-β2^t)/(1-β1^t) · m_t / (sqrt(v_t) + ε)``, i.e. ε is
  added to ``sqrt(v_t)`` before the second moment's bias correction;
* today: ``θ -= lr/(1-β1^t) · m_t / (sqrt(v_t)/sqrt(1-β2^t) + ε)``, i.e. ε is added after.

Written in the 0.3 form, today's update uses ``ε·sqrt(1-β2^t)`` in place of ε: about
30 times smaller at step 1 for β2 = 0.999 (sqrt(0.001) ≈ 0.0316), the same once
``β2^t`` is small. The two agree unless ``sqrt(v_t)`` is comparable to ε, that is
for very small gradients early in training. :class:`LegacyAdam` is the 0.3 update;
:func:`make_adam` picks one of the two.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class LegacyAdam(torch.optim.Optimizer):
    """``torch.optim.Adam`` of PyTorch 0.3 (no amsgrad, dense gradients only).

    Per parameter, with ``t`` its step count::

        g = grad + weight_decay * p                       (if weight_decay != 0)
        m = β1 m + (1-β1) g;   v = β2 v + (1-β2) g²
        p -= lr * sqrt(1-β2^t) / (1-β1^t) * m / (sqrt(v) + eps)

    The state keys (``step``, ``exp_avg``, ``exp_avg_sq``) are those of
    ``torch.optim.Adam``; ``step`` is a plain int as in 0.3.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("LegacyAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] = int(state["step"]) + 1
                t = state["step"]
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def make_adam(params: Iterable, lr: float, weight_decay: float = 0.0,
              legacy_eps: bool = False) -> torch.optim.Optimizer:
    """Adam with the default betas and ε: PyTorch 0.3's update (:class:`LegacyAdam`) when
    ``legacy_eps``, else ``torch.optim.Adam``."""
    if legacy_eps:
        return LegacyAdam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
