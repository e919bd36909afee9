r"""Implicit MAML (iMAML): meta-gradients through the inner *solution*, not the inner path.

Each task solves the proximal problem

.. math::
    t^\star_i = \arg\min_t\; L^s_i(t) + \frac{\lambda}{2}\lVert t - \theta\rVert^2

(approximately, with ``inner_steps`` steps of the inner optimizer from :math:`t = \theta`).
At the optimum :math:`dt^\star/d\theta = (I + H_i/\lambda)^{-1}` with :math:`H_i = \nabla^2
L^s_i(t^\star)`, so

.. math::
    g = \frac1T\sum_i \Bigl(I + \frac{H_i}{\lambda}\Bigr)^{-1} \nabla L^q_i(t^\star_i),

solved by conjugate gradient with Hessian-vector products (reverse over reverse): memory and
time independent of the number of inner steps.

Reference: Rajeswaran, Finn, Kakade, Levine, *Meta-Learning with Implicit Gradients*, NeurIPS 2019.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metagrad._errors import check_finite
from metagrad._typing import Buffers, LossFn, Params
from metagrad.algorithms._base import Learner, check_lr, check_steps
from metagrad.functional._checks import check_task
from metagrad.functional._inner import InnerSpec
from metagrad.functional._meta import AttachGrad
from metagrad.functional._optim import InnerOptimizer, make_inner_optimizer


def conjugate_gradient(
    matvec: object, b: list[Tensor], steps: int, tol: float = 1e-12
) -> tuple[list[Tensor], int, float]:
    r"""Solve :math:`A x = b` for symmetric positive-definite ``A`` given as ``matvec``.

    Args:
        matvec: callable ``list[Tensor] -> list[Tensor]`` computing :math:`A v`.
        b: right-hand side (list of tensors: one per parameter).
        steps: maximum CG iterations (``n`` iterations are exact in exact arithmetic).
        tol: stop when the residual norm falls below ``tol * ||b||``.

    Returns:
        ``(x, iterations, relative residual)``.
    """
    mv = matvec  # typed loosely: Callable[[list[Tensor]], list[Tensor]]

    def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
        return sum((a * c).sum() for a, c in zip(u, v))  # type: ignore[return-value]

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = dot(r, r)
    b_norm = float(rs.sqrt()) or 1.0
    it = 0
    for it in range(1, steps + 1):  # noqa: B007 (the count is returned)
        ap = mv(p)  # type: ignore[operator]
        alpha = rs / dot(p, ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rs_new = dot(r, r)
        if float(rs_new.sqrt()) <= tol * b_norm:
            rs = rs_new
            break
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x, it, float(rs.sqrt()) / b_norm


class IMAML(Learner):
    r"""Implicit MAML on any ``nn.Module`` (see the module docstring for the math).

    Args:
        model: the module to meta-learn (never mutated).
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        inner_lr: step size of the inner optimizer on the proximal objective.
        inner_steps: inner steps (the implicit gradient assumes they reach the optimum).
        lam: proximal strength :math:`\lambda > 0` (larger: closer to :math:`\theta`).
        cg_steps: conjugate-gradient iterations for :math:`(I + H/\lambda)^{-1}`.
        cg_damping: adds ``cg_damping * I`` to the system for robustness with indefinite ``H``.
        eval_steps: default steps of :meth:`adapt` (default ``inner_steps``).
        inner_optimizer: ``"sgd"`` (default), ``"momentum"``, ``"adam"`` or an optimizer object.
        bn: BatchNorm policy (see :class:`metagrad.MAML`).
        memory_format: ``"auto"`` (default: channels-last activations for stock ``torch.nn``
            conv nets on CPU, ~1.4x faster, same values), ``"channels_last"`` or ``"preserve"``.
        check_finite: raise :class:`metagrad.NonFiniteError` naming task and step on NaN/Inf.

    Example:
        >>> import torch, metagrad as mg
        >>> model = torch.nn.Linear(2, 1)
        >>> learner = mg.IMAML(model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=20, lam=1.0)
        >>> xs, ys, xq, yq = (torch.randn(3, 5, 2), torch.randn(3, 5, 1), torch.randn(3, 5, 2), torch.randn(3, 5, 1))
        >>> learner.meta_loss(xs, ys, xq, yq).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """

    fn_name = "metagrad.IMAML"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 10,
        *,
        lam: float = 1.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        eval_steps: int | None = None,
        inner_optimizer: str | InnerOptimizer = "sgd",
        bn: str = "transductive",
        memory_format: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__(model, loss_fn, bn, memory_format)
        fn = self.fn_name
        self.inner_lr = check_lr(fn, inner_lr)
        self.inner_steps = check_steps(fn, "inner_steps", inner_steps)
        self.eval_steps = (
            self.inner_steps if eval_steps is None else check_steps(fn, "eval_steps", eval_steps)
        )
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise ValueError(f"{fn}: lam={lam!r} must be a finite number > 0 (typical: 0.1 to 10).")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"{fn}: cg_steps={cg_steps!r} must be an int >= 1 (typical: 5 to 20).")
        if not (
            isinstance(cg_damping, (int, float)) and math.isfinite(cg_damping) and cg_damping >= 0
        ):
            raise ValueError(f"{fn}: cg_damping={cg_damping!r} must be a finite number >= 0.")
        self.lam, self.cg_steps, self.cg_damping = float(lam), cg_steps, float(cg_damping)
        self.inner_optimizer = make_inner_optimizer(inner_optimizer, fn)
        self.check_finite = bool(check_finite)
        self.last_cg: list[tuple[int, float]] = []  # (iterations, relative residual) per task

    def default_eval_steps(self) -> int:
        return self.eval_steps

    def inner_spec(self, steps: int, order: int, *, training: bool) -> InnerSpec:
        raise NotImplementedError("IMAML runs its own proximal inner loop; see IMAML.solve_inner.")

    def solve_inner(
        self, theta: Params, buffers: Buffers, x: Tensor, y: Tensor, steps: int, task: int = 0
    ) -> Params:
        r"""Approximate :math:`t^\star` by ``steps`` optimizer steps on the proximal objective."""
        anchor = {k: v.detach() for k, v in theta.items()}
        t = dict(anchor)
        state = self.inner_optimizer.init(t)
        lrs: dict[str, float | Tensor] = {k: self.inner_lr for k in t}
        for k in range(steps):
            with torch.enable_grad():
                a = {n: v.detach().requires_grad_() for n, v in t.items()}
                support = self.loss_fn(self.fmodel.forward(a, buffers, x), y)
                prox = sum(((a[n] - anchor[n]) ** 2).sum() for n in a)
                loss = support + 0.5 * self.lam * prox
                if self.check_finite:
                    check_finite(self.fn_name, loss, "proximal support loss", task, k)
                grads = dict(zip(a, torch.autograd.grad(loss, list(a.values()))))
            t, state = self.inner_optimizer.update(
                grads, state, {n: v.detach() for n, v in a.items()}, lrs, k
            )
            t = {n: v.detach() for n, v in t.items()}
            state = {n: v.detach() for n, v in state.items()}
        return t

    def task_gradient(
        self,
        theta: Params,
        buffers: Buffers,
        xs: Tensor,
        ys: Tensor,
        xq: Tensor,
        yq: Tensor,
        task: int,
        steps: int,
    ) -> tuple[Tensor, list[Tensor]]:
        """Query loss at :math:`t^\\star` and the implicit meta-gradient for one task."""
        t_star = self.solve_inner(theta, buffers, xs, ys, steps, task)
        names = list(t_star)
        with torch.enable_grad():
            a = {n: v.detach().requires_grad_() for n, v in t_star.items()}
            q = self.loss_fn(self.fmodel.forward(a, buffers, xq), yq)
            gq = list(torch.autograd.grad(q, [a[n] for n in names]))
            support = self.loss_fn(self.fmodel.forward(a, buffers, xs), ys)
            gs = torch.autograd.grad(
                support, [a[n] for n in names], create_graph=True, allow_unused=True
            )
        if any(g is None for g in gs):
            missing = [n for n, g in zip(names, gs) if g is None]
            raise ValueError(
                f"{self.fn_name}: parameters {missing} do not reach the support loss; iMAML needs "
                f"every trainable parameter in it. Freeze them with requires_grad=False."
            )

        def matvec(v: list[Tensor]) -> list[Tensor]:
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    gs, [a[n] for n in names], v, retain_graph=True, allow_unused=True
                )
            return [
                (1.0 + self.cg_damping) * vi + (torch.zeros_like(vi) if h is None else h) / self.lam
                for vi, h in zip(v, hv)
            ]

        x, it, res = conjugate_gradient(matvec, gq, self.cg_steps)
        self.last_cg.append((it, res))
        if self.check_finite:
            check_finite(self.fn_name, q, "query loss", task, None)
            for n, g in zip(names, x):
                check_finite(self.fn_name, g, f"implicit meta-gradient of {n!r}", task, None)
        return q.detach(), [g.detach() for g in x]

    def meta_grad(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> dict[str, Tensor]:
        """Implicit meta-gradient keyed ``"module.<name>"`` (``.grad`` untouched)."""
        _, grads = self._meta(xs, ys, xq, yq)
        return {f"module.{k}": g for k, g in grads.items()}

    def _meta(
        self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, need_grad: bool = True
    ) -> tuple[Tensor, Params]:
        """Mean query loss at the inner solutions and (if ``need_grad``) the implicit gradient."""
        xs, ys, xq, yq = self._tasks("meta_loss", xs, ys, xq, yq)
        steps = self.inner_steps if self.training else self.eval_steps
        theta = self.fmodel.params()
        self.fmodel.sync_modes()
        buffers = self.fmodel.buffers()
        T = xs.shape[0]
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        losses = []
        self.last_cg = []
        for i in range(T):
            if not need_grad:  # validation: the inner solution's query loss only
                t = self.solve_inner(theta, buffers, xs[i], ys[i], steps, i)
                losses.append(self.loss_fn(self.fmodel.forward(t, buffers, xq[i]), yq[i]))
                continue
            q, gs = self.task_gradient(theta, buffers, xs[i], ys[i], xq[i], yq[i], i, steps)
            losses.append(q)
            for k, g in zip(theta, gs):
                total[k] += g / T
        return torch.stack(losses).mean(), total

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        """Mean query loss at the inner solutions; ``.backward()`` writes the implicit meta-gradient."""
        if not torch.is_grad_enabled():
            return self._meta(xs, ys, xq, yq, need_grad=False)[0]
        loss, grads = self._meta(xs, ys, xq, yq)
        theta = self.fmodel.params()
        return AttachGrad.apply(loss, tuple(grads[k] for k in theta), *theta.values())  # type: ignore[no-any-return]

    def adapt(
        self, x: Tensor, y: Tensor, steps: int | None = None, *, differentiable: bool = False
    ) -> Params:
        """Approximate the proximal inner solution for one task (detached)."""
        if differentiable:
            raise ValueError(
                f"{self.fn_name}.adapt: differentiable=True is not available for iMAML, whose "
                f"meta-gradient is implicit; use meta_loss()/meta_grad()."
            )
        fn = f"{self.fn_name}.adapt"
        x, y = check_task(fn, x, y, *self._dtype_device())
        steps = self.eval_steps if steps is None else check_steps(fn, "steps", steps)
        self.fmodel.sync_modes()
        return self.solve_inner(self.fmodel.params(), self.fmodel.buffers(), x, y, steps)
