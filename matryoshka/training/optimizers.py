"""The training optimizers: AdamW, or Muon for the hidden weight matrices with AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each weight matrix's
momentum by the nearest semi-orthogonal matrix (five Newton-Schulz iterations), so every update
moves all of the matrix's directions by the same amount instead of following the few dominant ones.
Convolution kernels count as (out, in * kh * kw) matrices. The network's input and output
convolutions, embeddings, norms and biases stay on AdamW, as the method prescribes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Quintic Newton-Schulz coefficients (Jordan et al.): converge fastest from singular values near 0.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Scale of an orthogonalised (A, B) update: 0.2 sqrt(max(A, B)) gives it AdamW's typical RMS of ~0.2
# (Liu et al. 2025, "Muon is scalable for LLM training"), so the AdamW learning rate carries over.
_RMS_MATCH = 0.2
# Parameters that are not hidden matrices even where they are 2-D or 4-D.
_ADAM_ONLY = ("conv_in.", "conv_out.", "embedding")


def orthogonalise(matrix: Tensor, steps: int = 5) -> Tensor:
    """An approximately semi-orthogonal matrix U V^T of ``matrix`` = U S V^T (singular values ~0.7-1.2)."""
    a, b, c = _NS_COEFFICIENTS
    x = matrix.float()
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    x = x / (x.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def is_hidden_matrix(name: str, parameter: Tensor) -> bool:
    """Whether Muon updates this parameter (a hidden layer's weight matrix or convolution kernel)."""
    last = name.rsplit(".", 1)[-1]
    return parameter.ndim >= 2 and last == "weight" and not any(part in name for part in _ADAM_ONLY)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with ``muon=True``, AdamW on the others; one optimizer, so checkpoints,
    growth and lr schedules treat it like AdamW (every group takes the same ``lr``)."""

    def __init__(
        self,
        groups: Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, momentum=momentum, eps=eps, muon=False)
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if group["weight_decay"]:
                    parameter.mul_(1 - group["lr"] * group["weight_decay"])
                update = self._muon(parameter, group) if group["muon"] else self._adam(parameter, group)
                parameter.sub_(update.to(parameter.dtype), alpha=group["lr"])
        return loss

    def _muon(self, parameter: Tensor, group: dict) -> Tensor:
        state = self.state[parameter]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(parameter, dtype=torch.float32)
        buffer = state["momentum_buffer"]
        grad = parameter.grad.float()
        buffer.lerp_(grad, 1 - group["momentum"])
        nesterov = grad.lerp(buffer, group["momentum"])
        matrix = nesterov.reshape(len(nesterov), -1)
        scale = _RMS_MATCH * math.sqrt(max(matrix.shape))
        return (orthogonalise(matrix) * scale).view_as(parameter)

    def _adam(self, parameter: Tensor, group: dict) -> Tensor:
        state = self.state[parameter]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(parameter, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(parameter, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        grad = parameter.grad.float()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - beta1**step) / denominator


def build_optimizer(
    model: nn.Module, kind: str, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    """``kind``: "adamw" (every parameter) or "muon" (hidden matrices; AdamW for the rest)."""
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}; valid: adamw, muon")
    named = list(model.named_parameters())
    hidden = [p for name, p in named if is_hidden_matrix(name, p)]
    other = [p for name, p in named if not is_hidden_matrix(name, p)]
    groups = [{"params": hidden, "muon": True}, {"params": other, "muon": False}]
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, weight_decay=weight_decay)
