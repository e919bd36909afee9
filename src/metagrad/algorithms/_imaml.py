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
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from metagrad import optim
from metagrad._compat import pytree
from metagrad._errors import check_finite
from metagrad._typing import Buffers, LossFn, Params
from metagrad.algorithms._base import ImplicitLearner, check_steps
from metagrad.algorithms._imaml_vmap import IMPLICIT_ONLY, implicit_gradients, solve_proximal
from metagrad.algorithms._task import (
    MetaResult,
    make_inner_optimizer,
    refuse_closed_update,
    refuse_learned_hyperparams,
    vmap_pays,
)
from metagrad.bilevel import cg, custom_root
from metagrad.bilevel._foreign import add_pairs, foreign_leaves
from metagrad.functional._attention import higher_order_attention
from metagrad.functional._checks import check_task


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], steps: int, tol: float = 1e-12
) -> tuple[list[Tensor], int, float]:
    r"""Solve :math:`A x = b` for symmetric positive-definite ``A`` given as ``matvec``.

    A list-based view of :func:`metagrad.bilevel.cg`.

    Args:
        matvec: callable ``list[Tensor] -> list[Tensor]`` computing :math:`A v`.
        b: right-hand side (list of tensors: one per parameter).
        steps: maximum CG iterations (``n`` iterations are exact in exact arithmetic).
        tol: stop when the residual norm falls below ``tol * ||b||``.

    Returns:
        ``(x, iterations, relative residual)``.
    """
    keys = [str(i) for i in range(len(b))]

    def mv(v: Params) -> Params:
        return dict(zip(keys, matvec([v[k] for k in keys])))

    res = cg(mv, dict(zip(keys, b)), maxiter=steps, tol=tol)
    return [res.x[k] for k in keys], res.iterations, res.residual


class IMAML(ImplicitLearner):
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
        eval_lam: proximal strength of test-time adaptation (:meth:`adapt`, hence
            :func:`metagrad.training.evaluate`); ``None`` (default) uses ``lam``, ``0`` adapts by
            plain inner-optimizer steps on the support loss, as the iMAML reference code
            evaluates. Meta-training and :meth:`meta_loss` always solve the ``lam`` problem,
            which the implicit gradient differentiates.
        inner_optimizer: ``"sgd"`` (default), ``"momentum"``, ``"adam"`` or an optimizer object.
        bn: BatchNorm policy (see :class:`metagrad.MAML`).
        memory_format: ``"auto"`` (default: channels-last activations for stock ``torch.nn``
            conv nets on CPU: faster, same values; see BENCHMARKS.md), ``"channels_last"`` or ``"preserve"``.
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
        eval_lam: float | None = None,
        inner_optimizer: str | optim.Optimizer = "sgd",
        bn: str = "transductive",
        memory_format: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__(model, loss_fn, bn, memory_format)
        self._init_inner_loop(inner_lr, inner_steps, eval_steps)
        fn = self.fn_name
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise ValueError(f"{fn}: lam={lam!r} must be a finite number > 0 (typical: 0.1 to 10).")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"{fn}: cg_steps={cg_steps!r} must be an int >= 1 (typical: 5 to 20).")
        if not (
            isinstance(cg_damping, (int, float)) and math.isfinite(cg_damping) and cg_damping >= 0
        ):
            raise ValueError(f"{fn}: cg_damping={cg_damping!r} must be a finite number >= 0.")
        if eval_lam is not None and not (
            isinstance(eval_lam, (int, float))
            and not isinstance(eval_lam, bool)
            and math.isfinite(eval_lam)
            and eval_lam >= 0
        ):
            raise ValueError(
                f"{fn}: eval_lam={eval_lam!r} must be None (use lam) or a finite number >= 0 "
                f"(0: unregularized test-time adaptation)."
            )
        self.lam, self.cg_steps, self.cg_damping = float(lam), cg_steps, float(cg_damping)
        self.eval_lam = self.lam if eval_lam is None else float(eval_lam)
        self.inner_optimizer = make_inner_optimizer(inner_optimizer, fn)
        refuse_learned_hyperparams(
            self.inner_optimizer,
            self.fn_name,
            "iMAML's implicit gradient depends on the inner solution only, not on the optimizer that reached it",
        )
        self.check_finite = bool(check_finite)
        self.last_cg: list[tuple[int, float]] = []  # (iterations, relative residual) per task
        # per task: ||F(t*, theta)|| / (1 + ||t*||), how far the inner problem is from solved
        self.last_residual: list[float] = []
        # per task: whether CG met p^T ((1 + d) I + H/lam) p <= 0 (H has an eigenvalue below
        # -lam (1 + d), d = cg_damping)
        self.last_indefinite: list[bool] = []
        self._warned_indefinite = False

    def default_eval_steps(self) -> int:
        return self.eval_steps

    def solve_inner(
        self,
        theta: Params,
        buffers: Buffers,
        x: Tensor,
        y: Tensor,
        steps: int,
        task: int = 0,
        lam: float | None = None,
    ) -> Params:
        r"""Approximate :math:`t^\star` by ``steps`` optimizer steps on the proximal objective
        with strength ``lam`` (default ``self.lam``; 0: the support loss alone)."""
        lam = self.lam if lam is None else lam
        anchor = {k: v.detach() for k, v in theta.items()}
        t = dict(anchor)
        state = self.inner_optimizer.init(t)
        lrs: dict[str, float | Tensor] = {k: self.inner_lr for k in t}
        for k in range(steps):
            with torch.enable_grad():
                a = {n: v.detach().requires_grad_() for n, v in t.items()}
                support = self.loss_fn(self.fmodel.forward(a, buffers, x), y)
                loss = support
                if lam:
                    loss = loss + 0.5 * lam * sum(((a[n] - anchor[n]) ** 2).sum() for n in a)
                if self.check_finite:
                    check_finite(self.fn_name, loss, "proximal support loss", task, k)
                grads = dict(zip(a, torch.autograd.grad(loss, list(a.values()))))
            t, state = self.inner_optimizer.update(
                grads, state, {n: v.detach() for n, v in a.items()}, k, lrs
            )
            if k == 0:
                refuse_closed_update(t, self.fn_name, IMPLICIT_ONLY)
            t = {n: v.detach() for n, v in t.items()}
            state = pytree.tree_map(lambda x: x.detach(), state)
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
    ) -> tuple[Tensor, list[Tensor], list[tuple[Tensor, Tensor]]]:
        r"""Query loss at :math:`t^\star`, the implicit meta-gradient for one task and the
        gradients of tensors that the loss closes over (pairs; custom_root differentiates those
        in the support loss like one more hyperparameter).

        The proximal problem's stationarity :math:`F(t, \theta) = \nabla L^s(t) + \lambda(t -
        \theta) = 0` goes to :func:`metagrad.bilevel.custom_root`, whose backward solves
        :math:`(H + \lambda I)u = \nabla L^q` by CG and returns :math:`\lambda u = (I +
        H/\lambda)^{-1}\nabla L^q`.
        """
        names = list(theta)

        def optimality(t: Params, anchor: Params) -> Params:
            with higher_order_attention():  # CG differentiates this gradient (Hessian products)
                support = self.loss_fn(self.fmodel.forward(t, buffers, xs), ys)
            gs = torch.autograd.grad(
                support, [t[n] for n in names], create_graph=True, allow_unused=True
            )
            missing = [n for n, g in zip(names, gs) if g is None]
            if missing:
                raise ValueError(
                    f"{self.fn_name}: parameters {missing} do not reach the support loss; iMAML "
                    f"needs every trainable parameter in it. Freeze them with requires_grad=False."
                )
            return {n: g + self.lam * (t[n] - anchor[n]) for n, g in zip(names, gs)}  # type: ignore[operator]

        def solver(t_init: Params, anchor: Params) -> Params:
            return self.solve_inner(anchor, buffers, xs, ys, steps, task)

        root = custom_root(
            optimality,
            solve="cg",
            maxiter=self.cg_steps,
            tol=1e-12,
            damping=self.lam * self.cg_damping,  # (1 + d) I + H / lam, scaled by lam
        )(solver)
        anchor = {n: v.detach().requires_grad_() for n, v in theta.items()}
        with warnings.catch_warnings(), torch.enable_grad():
            # iMAML's contract is an approximate inner solution and a fixed CG budget; the
            # residuals are recorded in last_cg / last_residual instead of warned about.
            warnings.filterwarnings("ignore", "metagrad.bilevel.custom_root", RuntimeWarning)
            t_star = root(anchor, anchor)
            q = self.loss_fn(self.fmodel.forward(t_star, buffers, xq), yq)
            wrt = [anchor[n] for n in names]
            stray = foreign_leaves([q], wrt)
            got = torch.autograd.grad(q, [*wrt, *stray])  # q reaches every one of them
        grads = list(got[: len(wrt)])
        foreign = [(t, g.detach()) for t, g in zip(stray, got[len(wrt) :])]
        info = root.last_result
        assert info is not None  # set by the call above
        self.last_cg.append((int(info.solve_iterations or 0), float(info.solve_residual or 0.0)))
        self.last_indefinite.append(bool(info.solve_indefinite))
        self.last_residual.append(info.residual)
        if self.check_finite:
            check_finite(self.fn_name, q, "query loss", task, None)
            for n, g in zip(names, grads):
                check_finite(self.fn_name, g, f"implicit meta-gradient of {n!r}", task, None)
        return q.detach(), [g.detach() for g in grads], foreign

    def meta_result(
        self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, need_grad: bool = True
    ) -> MetaResult:
        """Mean query loss at the inner solutions and the implicit meta-gradient."""
        loss, grads, per_task, foreign = self._meta(xs, ys, xq, yq, need_grad=need_grad)
        keyed: dict[str, Tensor | None] = {f"module.{k}": g for k, g in grads.items()}
        return MetaResult(loss, keyed if need_grad else {}, per_task, foreign if need_grad else [])

    def _meta(
        self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, need_grad: bool = True
    ) -> tuple[Tensor, Params, Tensor, list[tuple[Tensor, Tensor]]]:
        """Mean query loss at the inner solutions, the implicit gradient (if ``need_grad``),
        the per-task losses and the closed-over tensors with their gradients."""
        xs, ys, xq, yq = self._tasks("meta_loss", xs, ys, xq, yq)
        steps = self.inner_steps if self.training else self.eval_steps
        theta = self.fmodel.params()
        self.fmodel.sync_modes()
        buffers = self.fmodel.buffers()
        T = xs.shape[0]
        self.last_cg = []
        self.last_residual = []
        self.last_indefinite = []
        if T > 1:
            batched = self._vmapped(theta, buffers, (xs, ys, xq, yq), steps, need_grad)
            if batched is not None:
                per_task, grads, foreign = batched
                self._warn_indefinite()
                return per_task.mean(), grads, per_task, foreign
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        stray: dict[int, tuple[Tensor, Tensor]] = {}  # by id: the same tensor in every task
        losses = []
        for i in range(T):
            if not need_grad:  # validation: the inner solution's query loss only
                t = self.solve_inner(theta, buffers, xs[i], ys[i], steps, i)
                losses.append(self.loss_fn(self.fmodel.forward(t, buffers, xq[i]), yq[i]))
                continue
            q, gs, pairs = self.task_gradient(theta, buffers, xs[i], ys[i], xq[i], yq[i], i, steps)
            losses.append(q)
            for k, g in zip(theta, gs):
                total[k] += g / T
            add_pairs(stray, pairs, 1.0 / T)
        per_task = torch.stack(losses)
        self._warn_indefinite()
        return per_task.mean(), total, per_task, list(stray.values())

    def _warn_indefinite(self) -> None:
        """Warn (once per learner) when CG met non-positive curvature in any task."""
        bad = [i for i, b in enumerate(self.last_indefinite) if b]
        if bad and not self._warned_indefinite:
            self._warned_indefinite = True
            warnings.warn(
                f"{self.fn_name}: CG met non-positive curvature of (1 + cg_damping) I + H / lam "
                f"in task(s) {bad[:8]} of {len(self.last_indefinite)} (lam={self.lam}, "
                f"cg_damping={self.cg_damping}): the inner Hessian H has eigenvalues below "
                f"-lam (1 + cg_damping) = {-self.lam * (1 + self.cg_damping):g} there, so the "
                f"implicit meta-gradient is unreliable (it can change "
                f"completely with rounding, e.g. float32 against float64). Fix: raise lam or "
                f"cg_damping; last_indefinite lists the tasks of the last call. Warned once "
                f"per learner.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _vmapped(
        self,
        theta: Params,
        buffers: Buffers,
        tasks: tuple[Tensor, Tensor, Tensor, Tensor],
        steps: int,
        need_grad: bool,
    ) -> tuple[Tensor, Params, list[tuple[Tensor, Tensor]]] | None:
        """Per-task query losses, the mean implicit gradient of all tasks at once and the
        closed-over tensors' gradients, or None.

        Where the default MAML strategy would vmap (vmap-safe models, not channels-last conv nets
        on CPU, tasks below :func:`~metagrad.algorithms._task.vmap_pays`' sizes), the inner
        solves run batched over tasks and the implicit solves as one batched CG
        (:mod:`metagrad.algorithms._imaml_vmap`; per task the iterates of the loop's CG). None
        means "run the per-task loop": not vmap-safe, an op without a batching rule (logged once,
        then the loop for this learner), or a non-finite result (the loop then names task and
        step).
        """
        xs, ys, xq, yq = tasks
        # The MAML rule for large dense tasks holds here too (iMAML, 1-640-640-1, 16 tasks:
        # batched 1.55x the loop; BENCHMARKS.md "vmap or the loop").
        if not self._batches_tasks(theta) or not vmap_pays(theta, xs, xq):
            return None
        fwd = self.fmodel.forward
        try:
            t_star = solve_proximal(
                fwd, self.loss_fn, self.inner_optimizer, theta, buffers, xs, ys,
                lam=self.lam, lr=self.inner_lr, steps=steps, fn_name=self.fn_name,
            )  # fmt: skip
            if not need_grad:
                with torch.no_grad():
                    per_task = torch.func.vmap(
                        lambda t, a, b: self.loss_fn(fwd(t, buffers, a), b),
                        randomness="different",
                    )(t_star, xq, yq)
                res = None
            else:
                res = implicit_gradients(
                    fwd, self.loss_fn, t_star, theta, buffers, tasks, lam=self.lam,
                    cg_steps=self.cg_steps, damping=self.cg_damping, tol=1e-12, fn_name=self.fn_name,
                )  # fmt: skip
        except RuntimeError as err:  # an op without a batching rule: the loop, from now on
            self._vmap_failed(err)
            return None
        self._vmap_ok = True
        values = [
            *t_star.values(),
            *([per_task] if res is None else [res.query, *res.grads.values()]),
        ]
        if self.check_finite and not all(bool(v.isfinite().all()) for v in values):
            return None  # the loop names the task and step
        if res is None:
            return per_task.detach(), {}, []
        self.last_cg = [
            (int(i), float(r)) for i, r in zip(res.cg.iterations.tolist(), res.cg.residual.tolist())
        ]
        self.last_residual = [float(r) for r in res.residual.tolist()]
        self.last_indefinite = [bool(b) for b in res.cg.indefinite.tolist()]
        return res.query, {k: g.mean(0) for k, g in res.grads.items()}, res.foreign

    def adapt(
        self, x: Tensor, y: Tensor, steps: int | None = None, *, differentiable: bool = False
    ) -> Params:
        """Approximate the inner solution for one task (detached), with proximal strength
        ``eval_lam``."""
        if differentiable:
            raise ValueError(
                f"{self.fn_name}.adapt: differentiable=True is not available for iMAML, whose "
                f"meta-gradient is implicit; use meta_loss()/meta_grad()."
            )
        fn = f"{self.fn_name}.adapt"
        x, y = check_task(fn, x, y, *self._dtype_device())
        steps = self.eval_steps if steps is None else check_steps(fn, "steps", steps)
        self.fmodel.sync_modes()
        theta, buffers = self.fmodel.params(), self.fmodel.buffers()
        return self.solve_inner(theta, buffers, x, y, steps, lam=self.eval_lam)
