"""cfmlib: the small flow-matching library behind the book *Flow Matching: an executable book*.

Time runs from noise (``t = 0``, ``x0 ~ N(0, I)``) to data (``t = 1``, ``x1 ~ q``),
as in Lipman et al. (2023).  One concern per module:

* :mod:`cfmlib.paths` -- Gaussian conditional paths (CondOT, VE, VP, cosine) and conversions
* :mod:`cfmlib.couplings` -- independent and exact minibatch-OT pairings
* :mod:`cfmlib.assignment` -- the exact assignment solver behind the OT coupling and exact W2
* :mod:`cfmlib.timesteps` -- densities of the training times
* :mod:`cfmlib.analytic` -- closed-form marginal densities, fields and scores
* :mod:`cfmlib.models` -- networks for the learned field ``v_theta(x, t)``
* :mod:`cfmlib.training` -- the CFM loss, one training step and the training loop
* :mod:`cfmlib.solvers` -- ODE solvers and sampling
* :mod:`cfmlib.likelihood` -- log-densities by the instantaneous change of variables
* :mod:`cfmlib.flows` -- the discrete affine-coupling flow of chapter 1
* :mod:`cfmlib.discrete` -- discrete flow matching: mixture paths on sequences of tokens (chapter 12)
* :mod:`cfmlib.manifolds` -- flow matching on the sphere and the flat torus (chapter 13)
* :mod:`cfmlib.fewstep` -- flow maps and few-step generation: MeanFlow, shortcut and consistency losses (chapter 14)
* :mod:`cfmlib.datasets`, :mod:`cfmlib.metrics`, :mod:`cfmlib.plotting`, :mod:`cfmlib.checkpoint`
* :mod:`cfmlib.errors` -- the exceptions cfmlib raises beyond Python's own
* :mod:`cfmlib.device` -- device choice and seeding
"""
from . import (analytic, assignment, checkpoint, couplings, datasets, device, discrete, errors, fewstep, flows, likelihood,
               manifolds, metrics, models, paths, plotting, solvers, timesteps, training)
from .analytic import EmpiricalDistribution, GaussianMixture, Marginal
from .datasets import get_dataset
from .device import get_device, seed_everything
from .models import MLP
from .paths import get_path
from .solvers import odeint, sample
from .training import cfm_loss, train, train_step

__version__ = "0.2.0"

__all__ = [
    "analytic", "assignment", "checkpoint", "couplings", "datasets", "device", "discrete", "errors", "fewstep", "flows",
    "likelihood", "manifolds", "metrics", "models", "paths", "plotting", "solvers", "timesteps", "training",
    "EmpiricalDistribution", "GaussianMixture", "Marginal", "get_dataset", "get_device", "seed_everything", "MLP",
    "get_path", "odeint", "sample", "cfm_loss", "train", "train_step",
]
