"""One read pass, many heads: the training loops of an ablation group, each batch read once for all.

Every point of a group runs its own, unchanged `fit_head` in a thread of pipeline/ablate_pass.py
(one thread runs at a time). When a head's recipe calls `FitContext.train`, the call comes
here (`GroupTrainer.train`) and the head waits ("parks") until every head of the group still
fitting has reached a training loop too. The trainer then runs all the parked loops:

- loops over the same batches (same split, fields, seed, epoch number, epochs and batch size
  of a store source) share one read loop: each batch is read and moved to the device once;
- within a read loop, heads whose step is a `StackedStep` (pipeline/stacked.py) with the same
  loss function and options, the same tensor shapes and an Adam/AdamW optimiser train as ONE
  vectorised stack: their tensors are stacked along a new leading axis (each head's own
  tensors become views into the stack for the loop, so hooks see them live), one call of the
  step gives all N losses, one backward pass all N gradients, and `StackedAdam` applies each
  head's own Adam/AdamW update (its lr, weight decay, betas, eps and moments) with the very
  ops torch's single-tensor Adam uses on that head's slice. Each head ends with exactly its
  lone-fit weights on the CPU with one torch thread, within float rounding otherwise. A stack's
  activations grow with N, so heads beyond `STACK_MEMORY_MB` form further stacks over the read;
- the other heads of a read loop (a step that is no StackedStep, e.g. one drawing Gumbel
  noise, shapes that differ, another optimiser) run their own step on the shared batch one
  after the other, each with its own torch random state swapped in ("shared");
- a loop over a source of its own (features a head derived and keeps in RAM) runs alone, as in
  a lone fit, with the head's whole random state (torch, numpy, Python) swapped in.

Steps and hooks of a shared loop draw random numbers from torch's generator or from generators
of their own (ctx.torch_generator, ctx.numpy_rng); numpy's and Python's global generators are
swapped per head only between loops (swapping them costs ~0.4 ms, a torch swap ~6 us).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from protocache.stores.errors import ProtocacheError

from .fit import loss_diverged
from .sources import StoreSplit, to_torch
from .stacked import Stack, StackedAdam, StackedStep


@dataclass
class TrainRequest:
    """One head's call of FitContext.train, parked until the group runs it."""

    member: int
    ctx: Any
    stage: str
    source: Any
    optimizer: Any
    epochs: int
    batch_size: int
    step: Callable
    after_step: Callable | None = None
    after_epoch: Callable | None = None
    error: BaseException | None = None
    totals: list[float] = field(default_factory=lambda: [0.0, 0])


class GroupTrainer:
    """Runs the training loops of a group's heads together (see the module docstring)."""

    def __init__(self):
        self.baton: Any = None
        self.store: Any = None
        self.loops: dict[int, list[str]] = {}
        """Per member, how each of its loops ran: `stage: vectorised (N heads)`, `shared (N heads)` or `alone`."""

    def bind(self, baton: Any, store: Any) -> None:
        self.baton, self.store = baton, store

    def train(self, ctx, stage, source, optimizer, epochs, batch_size, step, after_step=None, after_epoch=None):
        request = TrainRequest(self.baton.member, ctx, stage, source, optimizer, epochs, batch_size, step,
                               after_step, after_epoch)
        self.baton.park(request)
        if request.error is not None:
            raise request.error

    # ------------------------------------------------------------------ resolution
    def resolve(self, requests: list[TrainRequest]) -> None:
        """Run every parked loop: those over the same batches in one read loop, the rest alone."""
        loops: dict[Any, list[TrainRequest]] = {}
        for r in requests:
            loops.setdefault(read_key(r) or ("alone", r.member), []).append(r)
        for key, group in loops.items():
            if key[0] == "alone" or len(group) == 1:
                for r in group:
                    self._alone(r)
            else:
                self._read_loop(group)

    def _record(self, r: TrainRequest, mode: str) -> None:
        self.loops.setdefault(r.member, []).append(f"{r.stage}: {mode}")

    def _alone(self, r: TrainRequest) -> None:
        """The head's own loop, as in a lone fit (reads counted, not shared)."""
        self.baton.swap_in(r.member)
        group, r.ctx.group = r.ctx.group, None  # FitContext.train runs its own loop when no group is set
        try:
            r.ctx.train(r.stage, r.source, r.optimizer, r.epochs, r.batch_size, r.step,
                        after_step=r.after_step, after_epoch=r.after_epoch)
        except BaseException as exc:  # noqa: BLE001 - raised in the head's own thread
            r.error = exc
        finally:
            r.ctx.group = group
            self.baton.swap_out(r.member)
        self._record(r, "alone")

    def _read_loop(self, group: list[TrainRequest]) -> None:
        """One read of each batch for every head of `group` (same batches by read_key)."""
        started = time.perf_counter()
        first = group[0]
        source, epochs, batch_size = first.source, first.epochs, first.batch_size
        if source.resident:  # every head's source holds the same rows: read them once for all
            arrays = source._load()
            for r in group[1:]:
                r.source._arrays = arrays
        units = make_units(group, self.baton)
        for unit in units:
            for r in unit.requests:
                self._record(r, unit.mode)
        steps = math.ceil(source.num_rows / batch_size)
        device = first.ctx.device
        try:
            for epoch in range(epochs):
                number = {r.ctx.next_epoch() for r in group}.pop()  # equal: part of read_key
                for r in group:
                    r.totals = [0.0, 0]
                batches = source.batches(batch_size, epoch=number, shuffle=True)
                try:
                    for i, b in enumerate(batches):
                        live = [u for u in units if u.requests]
                        if not live:
                            break
                        batch = to_torch(b, device)  # (the same tensors for every head: steps leave them as they are)
                        self.store.count_served(sum(len(u.requests) for u in live) - 1)  # the read counted one
                        for unit in live:
                            unit.step(batch, epoch + i / steps, epoch, i)
                finally:
                    batches.close()
                for unit in units:
                    unit.end_epoch(epoch)
        except BaseException as exc:  # noqa: BLE001 - a failed read stops every head of the loop
            for r in group:
                r.error = r.error or exc
        finally:
            for unit in units:
                unit.finish()
        for r in group:
            if r.error is None and r.ctx.loss_curve:
                r.ctx.log(f"{r.stage}: {epochs} epoch(s), {epochs * steps} steps of batch {batch_size}, final loss "
                          f"{r.ctx.loss_curve[-1]['loss']:.4f} ({time.perf_counter() - started:.1f}s, one read pass "
                          f"for {len(group)} heads, {self.loops[r.member][-1].split(': ', 1)[1]})")


def read_key(r: TrainRequest) -> tuple | None:
    """What makes two loops read the same batches: the store view, split, fields, seed, epoch
    numbers, epochs, batch size and device; None for a source that is not the store's."""
    src = r.source
    view = getattr(getattr(src, "store", None), "view_key", None)
    if not isinstance(src, StoreSplit) or view is None:
        return None
    return ("store", view, src.split, src.fields, src.seed, src.shards_in_memory, src.num_rows, r.epochs,
            r.batch_size, r.ctx._epoch_counter, str(r.ctx.device))


# ----------------------------------------------------------------------------- units of a read loop


class SingleUnit:
    """One head's own step on the shared batch (its torch random state swapped in around it)."""

    def __init__(self, request: TrainRequest, baton: Any, heads: int):
        self.requests, self.baton = [request], baton
        self.mode = f"shared ({heads} heads)"

    def step(self, batch: dict[str, torch.Tensor], progress: float, epoch: int, i: int) -> None:
        r = self.requests[0]
        self.baton.use_torch_rng(r.member)
        try:
            loss = r.step(batch, progress)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise loss_diverged(r.stage, value, epoch, i)
            r.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            r.optimizer.step()
            if r.after_step is not None:
                r.after_step()
            n = len(batch["label"])
            r.totals[0] += value * n
            r.totals[1] += n
        except BaseException as exc:  # noqa: BLE001 - raised in the head's own thread
            r.error = exc
            self.requests = []
        finally:
            self.baton.keep_torch_rng(r.member)

    def end_epoch(self, epoch: int) -> None:
        self.requests = [r for r in self.requests if end_epoch(r, epoch, self.baton)]

    def finish(self) -> None:
        pass


def end_epoch(r: TrainRequest, epoch: int, baton: Any) -> bool:
    """The epoch's mean loss on the head's curve, then its after_epoch hook (as FitContext.train);
    False when the hook failed (the head stops with its error)."""
    total, count = r.totals
    r.ctx.loss_curve.append({"stage": r.stage, "epoch": epoch, "loss": total / max(count, 1)})
    if r.after_epoch is None:
        return True
    baton.use_torch_rng(r.member)
    try:
        r.after_epoch(epoch)
        return True
    except BaseException as exc:  # noqa: BLE001 - raised in the head's own thread
        r.error = exc
        return False
    finally:
        baton.keep_torch_rng(r.member)


def make_units(group: list[TrainRequest], baton: Any) -> list:
    """Stacks of heads that can train as one vectorised module, and single heads for the rest."""
    by_kind: dict[Any, list[TrainRequest]] = {}
    for r in group:
        by_kind.setdefault(stack_key(r) or ("single", r.member), []).append(r)
    units: list = []
    for key, requests in by_kind.items():
        size = stack_limit(requests[0])
        for chunk in (requests[i:i + size] for i in range(0, len(requests), size)):
            unit = StackUnit.build(chunk, baton, len(group)) if key[0] != "single" and len(chunk) > 1 else None
            units += [unit] if unit is not None else [SingleUnit(r, baton, len(group)) for r in chunk]
    return units


STACK_MEMORY_MB = 2048
"""A stack's activations grow with its heads: at most as many heads stack as fit in this many MB at
~4 float32 copies of a batch each (ProtoQuant's commitment term alone holds 2); the rest form more
stacks over the same read."""


def stack_limit(r: TrainRequest) -> int:
    """How many heads of `r`'s kind one stack may hold (at least 2)."""
    layout = r.source.store.layout
    sizes = {"tokens": layout.num_tokens * layout.dim, "pooled": layout.dim, "logits": layout.num_logits}
    per_image = sum(sizes.get(f, 0) for f in r.source.fields)
    per_head = 4 * 4 * per_image * r.batch_size
    return max(2, int(STACK_MEMORY_MB * 2**20 // max(per_head, 1)))


def trained_names(step: StackedStep, optimizer: Any) -> tuple[str, ...] | None:
    """Names of the head's parameters the optimiser steps; None when it steps anything else."""
    names = {id(p): n for n, p in step.head.named_parameters()}
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    if not params or any(id(p) not in names for p in params):
        return None
    chosen = {id(p) for p in params if p.requires_grad}
    return tuple(n for n, p in step.head.named_parameters() if id(p) in chosen)


def stack_key(r: TrainRequest) -> tuple | None:
    """Heads with equal keys can be stacked: the same stacked loss, options, tensor shapes and optimiser kind."""
    step = r.step
    if not isinstance(step, StackedStep) or type(r.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    names = trained_names(step, r.optimizer)
    if not names:
        return None
    tensors = tuple((n, tuple(t.shape), t.dtype, str(t.device)) for n, t in own_tensors(step.head).items())
    return ("stack", step.losses, type(step.head), repr(sorted(step.options.items())), tuple(sorted(step.hyper)),
            tensors, names, type(r.optimizer))


def own_tensors(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A head's parameters and buffers by name."""
    return {**dict(head.named_parameters()), **dict(head.named_buffers())}


class StackUnit:
    """N heads trained as one vectorised module (see the module docstring)."""

    def __init__(self, requests: list[TrainRequest], baton: Any, mode: str, names: tuple[str, ...],
                 optimizer: "StackedAdam"):
        self.requests, self.baton, self.mode, self.names, self.optimizer = requests, baton, mode, names, optimizer
        steps: list[StackedStep] = [r.step for r in requests]
        self.losses, self.options = steps[0].losses, steps[0].options
        self.hyper = steps[0].hyper_tensors(steps)
        self.checked = False  # whether the first step was seen to draw no random numbers
        # every tensor of the heads stacked; each head's own tensor becomes a view of its slice, so
        # hooks and the head itself see the values the stack trains
        self.own = [own_tensors(s.head) for s in steps]
        self.tensors: dict[str, torch.Tensor] = {}
        for name in self.own[0]:
            stacked = torch.stack([own[name].detach() for own in self.own])
            stacked.requires_grad_(name in names)
            for i, own in enumerate(self.own):
                own[name].data = stacked.detach()[i]
            self.tensors[name] = stacked
        optimizer.stack_moments([self.tensors[n] for n in names])

    @classmethod
    def build(cls, requests: list[TrainRequest], baton: Any, heads: int, mode: str | None = None
              ) -> "StackUnit | None":
        names = trained_names(requests[0].step, requests[0].optimizer)
        optimizer = StackedAdam.build([r.optimizer for r in requests], [r.step.head for r in requests], names)
        if optimizer is None:
            return None
        return cls(requests, baton, mode or f"vectorised ({len(requests)} of {heads} heads)", names, optimizer)

    def step(self, batch: dict[str, torch.Tensor], progress: float, epoch: int, i: int) -> None:
        before = None if self.checked else torch.get_rng_state()
        try:
            losses = self.losses(Stack(self.tensors, self.hyper, self.options), batch, progress)
            values = losses.detach().tolist()
        except BaseException as exc:  # noqa: BLE001 - raised in every head's own thread
            self._stop(range(len(self.requests)), lambda r, j, e=exc: e)
            return
        bad = [j for j, v in enumerate(values) if not math.isfinite(v)]
        if bad:  # those heads stop with the lone fit's error; the others go on from this very batch
            self._stop(bad, lambda r, j: loss_diverged(r.stage, values[j], epoch, i))
            if self.requests:
                self.step(batch, progress, epoch, i)
            return
        for name in self.names:
            self.tensors[name].grad = None
        losses.sum().backward()
        self.optimizer.step()
        n = len(batch["label"])
        for r, value in zip(self.requests, values):
            r.totals[0] += value * n
            r.totals[1] += n
        for j, r in enumerate(self.requests):
            if r.after_step is not None:
                self.baton.use_torch_rng(r.member)
                try:
                    r.after_step()
                except BaseException as exc:  # noqa: BLE001
                    self._stop([j], lambda r, j, e=exc: e)
                    return
                finally:
                    self.baton.keep_torch_rng(r.member)
        if before is not None:
            self.checked = True
            if not torch.equal(before, torch.get_rng_state()):
                error = ProtocacheError(f"{self.requests[0].stage}: the stacked step {self.losses.__name__} drew "
                                        "random numbers, which a StackedStep must not (pipeline/stacked.py)")
                self._stop(range(len(self.requests)), lambda r, j: error)

    def _stop(self, which, error: Callable[[TrainRequest, int], BaseException]) -> None:
        """Stop heads `which` (indices) with their errors and re-stack the others, which go on."""
        which = set(which)
        for j in which:
            self.requests[j].error = error(self.requests[j], j)
        keep = [r for j, r in enumerate(self.requests) if j not in which]
        self.finish()
        self.requests = []
        rebuilt = StackUnit.build(keep, self.baton, 0, self.mode) if keep else None
        if rebuilt is not None:
            rebuilt.checked = self.checked
            self.__dict__.update(rebuilt.__dict__)

    def end_epoch(self, epoch: int) -> None:
        failed = [j for j, r in enumerate(self.requests) if not end_epoch(r, epoch, self.baton)]
        if failed:
            self._stop(failed, lambda r, j: r.error)

    def finish(self) -> None:
        """Give every head its own tensors back (detached from the stack) and its optimiser its state."""
        for i, own in enumerate(self.own):
            for name, t in own.items():
                t.data = t.data.clone()
                grad = self.tensors[name].grad
                if grad is not None:  # as after a lone loop: the last step's gradient
                    t.grad = grad[i].clone()
        self.optimizer.write_back([[own[n] for n in self.names] for own in self.own])
        self.own = []
