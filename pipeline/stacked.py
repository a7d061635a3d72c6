"""Training steps written once over a stack of heads of one kind.

A `StackedStep` computes the losses of N heads at once from their tensors stacked along a
new leading axis ([N, ...] per parameter and buffer). A lone fit runs it on a stack of one
(its own tensors, each viewed as [1, ...]); an ablation read pass (pipeline/ablate_vectorised.py)
runs it once per batch for all the heads of a group whose shapes agree, so the batch is read
and moved to the device once and every tensor op serves all N heads.

Written with ops that compute each head's slice as they would for a stack of one (elementwise
ops, reductions within a head, and `headwise_bmm` for products), a head of a stack gets exactly
the numbers of its lone fit on the CPU with one torch thread; with more threads the kernels may
split the work differently for N heads than for one, and the weights agree to float rounding.

`StackedAdam` trains the stacked parameters as each head's own Adam/AdamW would, with each
head's hyper-parameters and moments, by the same kernels (see its docstring).

Rules for a stacked step: read the head's tensors only through the stack (`stack[name]`,
names as in `named_parameters` / `named_buffers`), the numbers that may differ between heads
through `stack.hyper(name, dims)`, options that change the computation through
`stack.options` (heads stack only when these are equal), draw no random numbers, and
return the [N] per-head losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class Stack:
    """The tensors of N heads of one kind, each stacked along a new leading axis."""

    def __init__(self, tensors: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor], options: dict[str, Any]):
        self.tensors, self._hyper, self.options = tensors, hyper, options
        self.size = len(next(iter(tensors.values())))

    @classmethod
    def of(cls, head: nn.Module, hyper: dict[str, torch.Tensor], options: dict[str, Any]) -> "Stack":
        """One head as a stack of one: views of its own tensors (gradients reach its parameters)."""
        tensors = {n: t.unsqueeze(0) for n, t in head.named_parameters()}
        tensors.update((n, t.unsqueeze(0)) for n, t in head.named_buffers())
        return cls(tensors, hyper, options)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def hyper(self, name: str, dims: int = 1) -> torch.Tensor:
        """Per-head value of number `name` as an [N, 1, ..., 1] tensor of `dims` dimensions."""
        return self._hyper[name].view((-1,) + (1,) * (dims - 1))


@dataclass
class StackedStep:
    """A training step for `FitContext.train` written over a stack of heads (see the module docstring).

    Called like any step, `step(batch, progress) -> loss`, it trains `head` alone; an
    ablation read pass calls `losses` on the stacked tensors of all heads with equal `options`.
    """

    losses: Callable[[Stack, dict[str, torch.Tensor], float], torch.Tensor]
    """losses(stack, batch, epoch_progress) -> [N] per-head losses."""
    head: nn.Module
    """The module whose parameters the step trains (and whose buffers it reads)."""
    hyper: dict[str, float] = field(default_factory=dict)
    """Numbers the step reads that may differ between the heads of a stack (e.g. a temperature)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings that change the computation itself; only heads with equal options stack."""

    def hyper_tensors(self, steps: "list[StackedStep] | None" = None) -> dict[str, torch.Tensor]:
        """The [N] tensor of each hyper-parameter over `steps` (default: this step alone)."""
        steps = steps or [self]
        device = next(self.head.parameters()).device
        return {k: torch.tensor([float(s.hyper[k]) for s in steps], dtype=torch.float32, device=device)
                for k in self.hyper}

    def __call__(self, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        if not hasattr(self, "_lone_hyper"):
            self._lone_hyper = self.hyper_tensors()
        return self.losses(Stack.of(self.head, self._lone_hyper, self.options), batch, progress)[0]


def headwise_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm of [N, M, K] and [N, K, P] (either may be expanded over N), forward and backward, with
    every head's product taken as a lone fit takes it.

    BLAS products can round differently when an operand does not start on a 64-byte boundary, and
    a head's slice of a stacked tensor starts at any offset: heads whose slices are all aligned go
    through one bmm, otherwise each head's product is taken on aligned copies."""
    if max(a.shape[0], b.shape[0]) == 1 and _aligned(a) and _aligned(b):  # a lone head: autograd's own bmm
        return torch.bmm(a, b)
    return _HeadwiseBmm.apply(a, b)


def _aligned(t: torch.Tensor) -> bool:
    step = t.stride(0) * t.element_size()
    return all((t.data_ptr() + i * step) % 64 == 0 for i in range(t.shape[0]))


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _aligned(a) and _aligned(b):
        return torch.bmm(a, b)
    n = max(a.shape[0], b.shape[0])
    a, b = a.expand(n, -1, -1), b.expand(n, -1, -1)
    return torch.cat([torch.bmm(*(x if _aligned(x) else x.clone() for x in (a[i:i + 1], b[i:i + 1])))
                      for i in range(n)])


class _HeadwiseBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _bmm(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # what autograd does for bmm, on aligned operands
        a, b = ctx.saved_tensors
        grad_a = _bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = _bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b  # (for an operand expanded over N, autograd's expand sums them)


def per_head_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] mean cross-entropy of each head's logits [N, B, C] against the batch's labels [B]."""
    return F.cross_entropy(logits.transpose(1, 2), labels.expand(len(logits), -1), reduction="none").mean(1)


class StackedAdam:
    """torch.optim.Adam / AdamW over stacked parameters, each head with its own hyper-parameters and
    moments. Each update op is torch's single-tensor Adam op applied to every head's slice (through
    torch's foreach ops with one scalar per head), so a head's numbers match its lone fit."""

    def __init__(self, optimizers: list[Any], hyper: list[list[dict[str, Any]]], steps: list[float],
                 moments: list[list[tuple[torch.Tensor, torch.Tensor] | None]]):
        self.optimizers, self.hyper, self.steps, self.moments = optimizers, hyper, steps, moments

    @classmethod
    def build(cls, optimizers: list[Any], heads: list[Any], names: tuple[str, ...] | None) -> "StackedAdam | None":
        """None where some optimiser is not a plain Adam/AdamW of exactly these parameters."""
        if not names:
            return None
        hyper, steps, moments = [], [], []
        for name in names:
            per_head, counts, state = [], set(), []
            for opt, head in zip(optimizers, heads):
                p = head.get_parameter(name)
                group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)
                if group is None or group.get("amsgrad") or group.get("maximize") or group.get("capturable") \
                        or group.get("differentiable") or group.get("fused") or torch.is_tensor(group["lr"]):
                    return None
                decoupled = bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))
                per_head.append({"lr": float(group["lr"]), "betas": tuple(map(float, group["betas"])),
                                 "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"]),
                                 "decoupled": decoupled})
                s = opt.state.get(p) or {}
                counts.add(float(s["step"]) if s else 0.0)
                state.append((s["exp_avg"], s["exp_avg_sq"]) if s else None)
            if len(counts) != 1:  # heads at different step counts: their bias corrections differ
                return None
            hyper.append(per_head)
            steps.append(counts.pop())
            moments.append(state)
        return cls(optimizers, hyper, steps, moments)

    def stack_moments(self, params: list[torch.Tensor]) -> None:
        """Stack the heads' moments for `params` (the stacked parameters, in `names` order)."""
        self.params = params
        self.exp_avg, self.exp_avg_sq = [], []
        for p, state in zip(params, self.moments):
            m, v = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())
            for i, s in enumerate(state):
                if s is not None:
                    m[i].copy_(s[0])
                    v[i].copy_(s[1])
            self.exp_avg.append(m)
            self.exp_avg_sq.append(v)
        self.parts = [(lone_parts(m), lone_parts(v)) for m, v in zip(self.exp_avg, self.exp_avg_sq)]
        self.decay, self.kinds = [], []
        for p, hyper in zip(params, self.hyper):
            shared = {(h["betas"], h["eps"], h["decoupled"]) for h in hyper}
            coupled = {h["weight_decay"] for h in hyper if not h["decoupled"]}
            self.kinds.append(next(iter(shared)) + tuple(coupled) if len(shared) == 1 and len(coupled) <= 1 else None)
            decays = [1 - h["lr"] * h["weight_decay"] if h["decoupled"] else h["weight_decay"] for h in hyper]
            self.decay.append(per_head(decays, p) if any(h["weight_decay"] != 0 for h in hyper) else None)

    @torch.no_grad()
    def step(self) -> None:
        together: dict[tuple, list[int]] = {}
        for k, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.steps[k] += 1
            if self.kinds[k] is None:
                self._step_each(p, k, self.hyper[k], self.steps[k])
            else:
                together.setdefault(self.kinds[k] + (self.steps[k],), []).append(k)
        for ks in together.values():
            self._step_stacked(ks)

    def _step_stacked(self, ks: list[int]) -> None:
        """Parameters `ks` of all heads at once (per parameter, the heads' betas, eps and kind of weight
        decay are equal; lr and decoupled weight decay may differ). Ops whose vectorised and scalar
        kernels may round differently (lerp, addcmul, add with alpha: fused multiply-adds) run on each
        head's vector-sized part and on its tail apart, as on a lone tensor (`lone_parts`);
        one-rounding ops (mul, div, sqrt, add) run on the stacks."""
        first = self.hyper[ks[0]][0]
        (beta1, beta2), eps, decoupled, step = first["betas"], first["eps"], first["decoupled"], self.steps[ks[0]]
        params = [self.params[k].detach() for k in ks]
        grads = [self.params[k].grad for k in ks]
        decay = [(p, self.decay[k]) for p, k in zip(params, ks) if self.decay[k] is not None]
        if decay and decoupled:
            torch._foreach_mul_([p for p, _ in decay], [f for _, f in decay])
        elif decay:  # Adam's weight decay goes into the gradient
            grads = [g.clone() for g in grads]
            torch._foreach_add_(parts(grads), parts(params), alpha=first["weight_decay"])
        grad_parts = parts(grads)
        torch._foreach_lerp_([m for k in ks for m in self.parts[k][0]], grad_parts, 1 - beta1)
        torch._foreach_mul_([self.exp_avg_sq[k] for k in ks], beta2)
        torch._foreach_addcmul_([v for k in ks for v in self.parts[k][1]], grad_parts, grad_parts, 1 - beta2)
        denom = torch._foreach_sqrt([self.exp_avg_sq[k] for k in ks])
        torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
        torch._foreach_add_(denom, eps)
        # addcdiv with a value per head: what its kernel computes, (value * exp_avg) / denom + param
        update = torch._foreach_mul([self.exp_avg[k] for k in ks],
                                    [per_head([-(h["lr"] / (1 - beta1 ** step)) for h in self.hyper[k]], p)
                                     for k, p in zip(ks, params)])
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)

    def _step_each(self, p: torch.Tensor, k: int, hyper: list[dict[str, Any]], step: float) -> None:
        """Head by head, through torch's foreach ops with one scalar per head (betas or eps differ)."""
        params, exp_avgs, exp_avg_sqs = list(p.detach().unbind(0)), list(self.exp_avg[k].unbind(0)), \
            list(self.exp_avg_sq[k].unbind(0))
        grads = list(p.grad.unbind(0))
        for i, h in enumerate(hyper):
            if h["weight_decay"] != 0 and not h["decoupled"]:
                grads[i] = grads[i].add(params[i], alpha=h["weight_decay"])
        decay = [(i, 1 - h["lr"] * h["weight_decay"]) for i, h in enumerate(hyper)
                 if h["weight_decay"] != 0 and h["decoupled"]]
        if decay:
            torch._foreach_mul_([params[i] for i, _ in decay], [f for _, f in decay])
        torch._foreach_lerp_(exp_avgs, grads, [1 - h["betas"][0] for h in hyper])
        torch._foreach_mul_(exp_avg_sqs, [h["betas"][1] for h in hyper])
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, [1 - h["betas"][1] for h in hyper])
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - h["betas"][1] ** step) ** 0.5 for h in hyper])
        torch._foreach_add_(denom, [h["eps"] for h in hyper])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-(h["lr"] / (1 - h["betas"][0] ** step)) for h in hyper])

    def write_back(self, params: list[list[torch.Tensor]]) -> None:
        """Write each head's step count and moments into its own optimiser (params[i]: head i's, in order)."""
        for i, (opt, own) in enumerate(zip(self.optimizers, params)):
            for k, p in enumerate(own):
                if self.steps[k]:
                    opt.state[p] = {"step": torch.tensor(float(self.steps[k])), "exp_avg": self.exp_avg[k][i].clone(),
                                    "exp_avg_sq": self.exp_avg_sq[k][i].clone()}


VECTOR_CHUNK = 32
"""Elements ATen's CPU kernels take per vectorised step (2 x 16 float lanes with AVX512; AVX2's 16 divides it):
the last numel % 32 elements of a tensor go through the scalar loop."""


def lone_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """Views of a stacked [N, ...] tensor that an elementwise kernel walks as it walks each head's tensor
    alone: every head's first numel - numel % 32 elements (vectorised), then every head's tail (scalar)."""
    flat = t.view(len(t), -1)
    cut = flat.shape[1] - flat.shape[1] % VECTOR_CHUNK
    return [part for part in (flat[:, :cut], flat[:, cut:]) if part.shape[1]]


def per_head(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """[N, 1, ...] float32 tensor of one value per head, broadcasting over a stacked tensor like `like`."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view((-1,) + (1,) * (like.dim() - 1))


def parts(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`lone_parts` of every tensor, in order."""
    return [part for t in tensors for part in lone_parts(t)]
