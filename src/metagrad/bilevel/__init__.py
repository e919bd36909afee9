"""The bilevel core: differentiate an outer objective through any inner optimization.

A :class:`Problem` names an inner objective ``f(w, h, batch)``, an outer objective
``g(w, h, batch)``, a differentiable optimizer (:mod:`metagrad.optim`) and a number of steps;
:func:`hypergrad` returns the outer value and its exact gradient with respect to the
initialization ``w0``, the hyperparameters ``h`` and the optimizer's tensor hyperparameters,
by one of several strategies (unrolled, vmapped, adjoint, checkpointed, truncated, forward mode,
implicit). :func:`custom_root` / :func:`fixed_point` differentiate any solver implicitly, and
:func:`innerloop` turns an ordinary training loop into a differentiable one.

MAML and its relatives (:mod:`metagrad.algorithms`) are built on this package.
"""

from __future__ import annotations

from metagrad.bilevel._api import STRATEGIES, hypergrad, resolve
from metagrad.bilevel._diffopt import DiffOptimizer
from metagrad.bilevel._implicit import ImplicitSolver, RootInfo, custom_root, fixed_point
from metagrad.bilevel._implicit_strategy import ImplicitOptions
from metagrad.bilevel._innerloop import FastModel, innerloop
from metagrad.bilevel._linsolve import SolveResult, cg, neumann, normal_cg
from metagrad.bilevel._problem import HyperGrad, MetaParams, Objective, PerStep, Problem
from metagrad.bilevel._vmap import Cache

__all__ = [
    "STRATEGIES",
    "Cache",
    "DiffOptimizer",
    "FastModel",
    "HyperGrad",
    "ImplicitOptions",
    "ImplicitSolver",
    "MetaParams",
    "Objective",
    "PerStep",
    "Problem",
    "RootInfo",
    "SolveResult",
    "cg",
    "custom_root",
    "fixed_point",
    "hypergrad",
    "innerloop",
    "neumann",
    "normal_cg",
    "resolve",
]
