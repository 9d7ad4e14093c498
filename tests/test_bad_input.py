"""Bad input gets a clear error, before any computation.

One table: each row is a call with a bad argument, the exception type it must raise
(``ValueError`` or ``TypeError``; ``FileNotFoundError`` for a missing file) and substrings
the message must contain -- the argument's name first, and for names (paths, couplings,
solvers, data sets, ...) the list of valid ones.  The rows walk the public functions in
each module's ``__all__``; tensors on another device are simulated with the ``meta``
device (no GPU needed).  Everything is tiny: the whole table runs in a few seconds.
"""
import inspect

import pytest
import torch

from cfmlib import (analytic, checkpoint, couplings, datasets, device, flows, likelihood, metrics, models, paths,
                    solvers, training)

torch.manual_seed(0)
X = torch.randn(4, 2)
Y = torch.randn(4, 2)
X5 = torch.randn(5, 2)
X3D = torch.randn(4, 3)
NAN = X.clone()
NAN[1, 0] = float("nan")
INF = X.clone()
INF[2, 1] = float("inf")
META = torch.randn(4, 2, device="meta")
TRAJ = torch.randn(6, 4, 2)


def mlp(**kw):
    return models.MLP(**{"dim": 2, "hidden": 8, "depth": 1, **kw})


def cond():
    return mlp(num_classes=3)


def field(x, t, **kw):
    return -x


def gm():
    return analytic.GaussianMixture(torch.randn(3, 2), 0.5)


def ot():
    return paths.CondOTPath()


def flow():
    return flows.AffineCouplingFlow(dim=2, n_layers=2, hidden=8, depth=1)


def train(data=X, model=None, **kw):
    settings = dict(steps=2, batch_size=4, progress=False, device="cpu")
    settings.update(kw)
    return training.train(model if model is not None else mlp(), data, **settings)


class Narrow(torch.nn.Module):
    """A field built for 2-D data whose output has the wrong shape (batch, 1): it would broadcast."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.config = {"dim": 2}

    def forward(self, x, t, y=None):
        return self.lin(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], 1))


def sampler_without_generator(n):
    return torch.randn(n, 2)


def sampler_numpy(n, generator=None):
    import numpy as np

    return np.zeros((n, 2), dtype=np.float32)


def sampler_wide(n, generator=None):
    return torch.randn(n, 3, generator=generator)


def sampler_empty(n, generator=None):
    return torch.zeros(0, 2)


def sampler_float64(n, generator=None):
    return torch.randn(n, 2, generator=generator, dtype=torch.float64)


def ckpt_is_a_folder(tmp):
    return train(checkpoint=tmp)


def load_folder(tmp):
    return checkpoint.load_checkpoint(tmp)


def load_in_missing_folder(tmp):
    return checkpoint.load_model(tmp / "no" / "such" / "run.pt")


def foreign_checkpoint(tmp):
    p = tmp / "resnet.pt"
    checkpoint.save_checkpoint(p, {"model": {"w": torch.zeros(2)}, "config": {"kind": "resnet", "depth": 50}})
    return checkpoint.load_model(p)


def resume_foreign_file(tmp):
    p = tmp / "other.pt"
    checkpoint.save_checkpoint(p, {"weights": torch.zeros(2)})
    return train(checkpoint=p)


def ckpt_other_config(tmp):
    p = tmp / "c.pt"
    train(model=mlp(hidden=8), checkpoint=p)
    return train(model=mlp(hidden=16), checkpoint=p)


def garbage_file(tmp):
    p = tmp / "garbage.pt"
    p.write_bytes(b"this is not a checkpoint")
    return checkpoint.load_checkpoint(p)


def no_config(tmp):
    p = tmp / "plain.pt"
    checkpoint.save_checkpoint(p, {"step": 1})
    return checkpoint.load_model(p)


def labels(*v):
    return torch.tensor(v)


PATH_NAMES = "ot, ve, vp, cosine"
METHODS = "euler, midpoint, rk4, dopri5"

# (id, call, exception type, substrings of the message); calls taking one argument get a tmp folder
ROWS = [
    # --- paths: names, parameters, shapes, times, finiteness, devices --------------------------------
    ("get_path unknown name", lambda: paths.get_path("rectified"), ValueError, ("path", PATH_NAMES)),
    ("get_path not a str", lambda: paths.get_path(3), ValueError, ("path", PATH_NAMES)),
    ("get_path object with kwargs", lambda: paths.get_path(ot(), sigma_min=0.1), ValueError, ("path",)),
    ("get_path unknown kwarg", lambda: paths.get_path("condot", sigma=0.1), TypeError, ("sigma",)),
    ("CondOTPath sigma_min < 0", lambda: paths.CondOTPath(-0.1), ValueError, ("sigma_min", "[0.0, 1.0)")),
    ("CondOTPath sigma_min = 1", lambda: paths.CondOTPath(1.0), ValueError, ("sigma_min", "got 1.0")),
    ("CondOTPath sigma_min nan", lambda: paths.CondOTPath(float("nan")), ValueError, ("sigma_min", "finite")),
    ("CondOTPath sigma_min str", lambda: paths.CondOTPath("0.1"), TypeError, ("sigma_min",)),
    ("VEPath sigma_min = 0", lambda: paths.VEPath(0.0), ValueError, ("sigma_min",)),
    ("VEPath sigma_max < sigma_min", lambda: paths.VEPath(1.0, 0.5), ValueError, ("sigma_max",)),
    ("VPPath beta_min = 0", lambda: paths.VPPath(0.0), ValueError, ("beta_min",)),
    ("VPPath beta_max < beta_min", lambda: paths.VPPath(5.0, 1.0), ValueError, ("beta_max",)),
    ("sample_xt batch mismatch", lambda: ot().sample_xt(X, X5, 0.5), ValueError, ("x0", "x1", "(4, 2)", "(5, 2)")),
    ("sample_xt dim mismatch", lambda: ot().sample_xt(X, X3D, 0.5), ValueError, ("x0", "x1", "(4, 3)")),
    ("sample_xt t > 1", lambda: ot().sample_xt(X, Y, 1.5), ValueError, ("t", "[0.0, 1.0]", "1.5")),
    ("sample_xt t < 0", lambda: ot().sample_xt(X, Y, torch.full((4,), -0.1)), ValueError, ("t", "[0.0, 1.0]")),
    ("sample_xt t batch mismatch", lambda: ot().sample_xt(X, Y, torch.rand(5)), ValueError, ("t", "5", "4")),
    ("sample_xt t wrong shape", lambda: ot().sample_xt(X, Y, torch.rand(4, 2)), ValueError, ("t", "(4, 2)")),
    ("sample_xt t nan", lambda: ot().sample_xt(X, Y, float("nan")), ValueError, ("t", "finite")),
    ("sample_xt t str", lambda: ot().sample_xt(X, Y, "0.5"), TypeError, ("t",)),
    ("sample_xt x0 nan", lambda: ot().sample_xt(NAN, Y, 0.5), ValueError, ("x0", "NaN")),
    ("sample_xt x1 inf", lambda: ot().sample_xt(X, INF, 0.5), ValueError, ("x1", "infinite")),
    ("sample_xt x0 numpy", lambda: ot().sample_xt(X.numpy(), Y, 0.5), TypeError, ("x0", "torch.Tensor")),
    ("sample_xt x0 integer", lambda: ot().sample_xt(X.long(), Y, 0.5), TypeError, ("x0", "floating")),
    ("sample_xt x0 unbatched", lambda: ot().sample_xt(X[0], Y[0], 0.5), ValueError, ("x0", "batch")),
    ("sample_xt x0 on meta", lambda: ot().sample_xt(META, Y, 0.5), ValueError, ("x0", "meta", "cpu")),
    ("sample_xt t on meta", lambda: ot().sample_xt(X, Y, torch.rand(4, device="meta")), ValueError,
     ("t", "meta")),
    ("target batch mismatch", lambda: ot().target(X, X5, 0.5), ValueError, ("x0", "x1")),
    ("sample t > 1", lambda: ot().sample(X, Y, 2.0), ValueError, ("t",)),
    ("conditional_field shape mismatch", lambda: ot().conditional_field(X, X3D, 0.5), ValueError, ("x", "x1")),
    ("conditional_field sigma_t = 0", lambda: ot().conditional_field(X, Y, 1.0), ValueError, ("t", "sigma_t")),
    ("conditional_score sigma_t = 0", lambda: ot().conditional_score(X, Y, 1.0), ValueError,
     ("t", "sigma_t")),
    ("conditional_log_prob x1 on meta", lambda: ot().conditional_log_prob(X, META, 0.5), ValueError,
     ("x1", "meta")),
    ("velocity_to_noise batch mismatch", lambda: ot().velocity_to_noise(X, X5, 0.5), ValueError, ("v", "x")),
    ("velocity_to_score sigma_t = 0", lambda: ot().velocity_to_score(X, Y, 1.0), ValueError, ("t", "sigma_t")),
    ("noise_to_velocity alpha_t = 0", lambda: ot().noise_to_velocity(X, Y, 0.0), ValueError, ("t", "alpha_t")),
    ("score_to_velocity nan", lambda: ot().score_to_velocity(NAN, Y, 0.5), ValueError, ("score", "NaN")),
    ("schedule t > 1", lambda: ot().schedule(1.01), ValueError, ("t",)),
    ("sample_source negative shape", lambda: ot().sample_source((-1, 2)), ValueError, ("shape", "(-1, 2)")),
    ("sample_source shape not a tuple", lambda: ot().sample_source(3), TypeError, ("shape",)),
    # --- couplings -------------------------------------------------------------------------------
    ("independent batch mismatch", lambda: couplings.independent(X, X5), ValueError, ("x0", "x1")),
    ("ot_permutation dim mismatch", lambda: couplings.ot_permutation(X, X3D), ValueError, ("x0", "x1")),
    ("ot_permutation nan", lambda: couplings.ot_permutation(NAN, Y), ValueError, ("x0", "NaN")),
    ("ot_permutation devices", lambda: couplings.ot_permutation(X, META), ValueError, ("x1", "meta")),
    ("ot_permutation one label set", lambda: couplings.ot_permutation(X, Y, labels(0, 0, 1, 1)), ValueError,
     ("labels0", "labels1")),
    ("ot_permutation labels shape", lambda: couplings.ot_permutation(X, Y, labels(0, 1), labels(0, 1)),
     ValueError, ("labels0", "(4,)")),
    ("ot_pair batch mismatch", lambda: couplings.ot_pair(X, X5), ValueError, ("x0", "x1")),
    ("pair unknown coupling", lambda: couplings.pair("sinkhorn", X, Y), ValueError,
     ("coupling", "independent, ot")),
    ("sq_cost dim mismatch", lambda: couplings.sq_cost(X, X3D), ValueError, ("x0", "x1")),
    ("sq_cost devices", lambda: couplings.sq_cost(X, META), ValueError, ("x1", "meta")),
    ("is_permutation not a tensor", lambda: couplings.is_permutation([0, 1], 2), TypeError, ("perm",)),
    ("is_permutation n < 0", lambda: couplings.is_permutation(torch.arange(2), -2), ValueError, ("n",)),
    ("reflow_pairs n = 0", lambda: couplings.reflow_pairs(mlp(), 0), ValueError, ("n",)),
    ("reflow_pairs steps = 0", lambda: couplings.reflow_pairs(mlp(), 4, steps=0), ValueError, ("steps",)),
    ("reflow_pairs unknown method", lambda: couplings.reflow_pairs(mlp(), 4, method="rk45"), ValueError,
     ("method", METHODS)),
    ("reflow_pairs model not callable", lambda: couplings.reflow_pairs("model", 4), TypeError, ("model",)),
    # --- analytic ------------------------------------------------------------------------------
    ("GaussianMixture means 1-d", lambda: analytic.GaussianMixture(torch.randn(3)), ValueError, ("means",)),
    ("GaussianMixture means nan", lambda: analytic.GaussianMixture(NAN), ValueError, ("means", "NaN")),
    ("GaussianMixture stds < 0", lambda: analytic.GaussianMixture(X, -1.0), ValueError, ("stds",)),
    ("GaussianMixture stds wrong K", lambda: analytic.GaussianMixture(X, torch.ones(3)), ValueError, ("stds",)),
    ("GaussianMixture weights < 0", lambda: analytic.GaussianMixture(X, 1.0, torch.tensor([1., -1, 1, 1])),
     ValueError, ("weights",)),
    ("GaussianMixture weights wrong K", lambda: analytic.GaussianMixture(X, 1.0, torch.ones(2)), ValueError,
     ("weights", "4")),
    ("GaussianMixture weights on meta", lambda: analytic.GaussianMixture(X, 1.0, torch.ones(4, device="meta")),
     ValueError, ("weights", "meta")),
    ("GaussianMixture.sample n = 0", lambda: gm().sample(0), ValueError, ("n",)),
    ("GaussianMixture.sample bad generator", lambda: gm().sample(3, generator=0), TypeError, ("generator",)),
    ("GaussianMixture.log_prob wrong dim", lambda: gm().log_prob(X3D), ValueError, ("x", "(batch, 2)")),
    ("GaussianMixture.score on meta", lambda: gm().score(META), ValueError, ("x", "meta")),
    ("EmpiricalDistribution 1-d points", lambda: analytic.EmpiricalDistribution(torch.randn(5)), ValueError,
     ("points",)),
    ("Marginal q not a mixture", lambda: analytic.Marginal("moons"), TypeError, ("q",)),
    ("Marginal unknown path", lambda: analytic.Marginal(gm(), "straight"), ValueError, ("path", PATH_NAMES)),
    ("Marginal.field t > 1", lambda: analytic.Marginal(gm())(X, 1.5), ValueError, ("t",)),
    ("Marginal.log_prob wrong dim", lambda: analytic.Marginal(gm()).log_prob(X3D, 0.5), ValueError, ("x",)),
    ("Marginal.score t batch mismatch", lambda: analytic.Marginal(gm()).score(X, torch.rand(3)), ValueError,
     ("t",)),
    ("Marginal degenerate (points, t=1)", lambda: analytic.Marginal(analytic.EmpiricalDistribution(X)).field(Y, 1.0),
     ValueError, ("sigma_min",)),
    ("continuity_residual not callable", lambda: analytic.continuity_residual(3, field, X, 0.5), TypeError,
     ("log_prob_fn",)),
    ("continuity_residual t < 0", lambda: analytic.continuity_residual(gm().log_prob, field, X, -1.0), ValueError,
     ("t",)),
    # --- models --------------------------------------------------------------------------------
    ("MLP dim = 0", lambda: models.MLP(dim=0), ValueError, ("dim",)),
    ("MLP hidden float", lambda: models.MLP(hidden=2.5), TypeError, ("hidden",)),
    ("MLP odd time_features", lambda: models.MLP(time_features=3), ValueError, ("time_features",)),
    ("MLP num_classes = 0", lambda: models.MLP(num_classes=0), ValueError, ("num_classes",)),
    ("MLP call wrong dim", lambda: mlp()(X3D, 0.5), ValueError, ("x", "(batch, 2)", "(4, 3)")),
    ("MLP call t batch mismatch", lambda: mlp()(X, torch.rand(5)), ValueError, ("t", "batch=4")),
    ("MLP call y without classes", lambda: mlp()(X, 0.5, labels(0, 1, 2, 0)), ValueError, ("y", "num_classes")),
    ("MLP call y wrong batch", lambda: cond()(X, 0.5, labels(0, 1)), ValueError, ("y", "(4,)")),
    ("MLP call y float", lambda: cond()(X, 0.5, torch.zeros(4)), ValueError, ("y", "integer")),
    ("build_model unknown kind", lambda: models.build_model({"kind": "transformer"}), ValueError,
     ("model kind", "mlp")),
    ("build_model not a dict", lambda: models.build_model("mlp"), ValueError, ("config",)),
    ("build_model bad hidden", lambda: models.build_model({"kind": "mlp", "hidden": -1}), ValueError, ("hidden",)),
    ("build_model unknown key", lambda: models.build_model({"kind": "mlp", "width": 3}), TypeError, ("width",)),
    ("UNet odd image", lambda: models.UNet(image_shape=(1, 7, 7)), ValueError, ("7",)),
    ("UNet image_shape 2-d", lambda: models.UNet(image_shape=(8, 8)), ValueError, ("image_shape",)),
    ("UNet call wrong shape", lambda: models.UNet(base=8, time_features=8)(torch.randn(2, 1, 6, 6), 0.5),
     ValueError, ("x", "(batch, 1, 8, 8)")),
    ("CFGField unconditional model", lambda: models.CFGField(mlp(), 1.0), ValueError, ("model", "num_classes")),
    ("guided w not a number", lambda: models.guided(cond(), "2"), TypeError, ("w",)),
    ("CFGField call without y", lambda: models.guided(cond(), 1.0)(X, 0.5), ValueError, ("y",)),
    # --- training ------------------------------------------------------------------------------
    ("cfm_loss batch mismatch", lambda: training.cfm_loss(mlp(), X, X5, 0.5), ValueError, ("x0", "x1")),
    ("cfm_loss t > 1", lambda: training.cfm_loss(mlp(), X, Y, 1.5), ValueError, ("t", "[0.0, 1.0]")),
    ("cfm_loss t batch mismatch", lambda: training.cfm_loss(mlp(), X, Y, torch.rand(3)), ValueError, ("t",)),
    ("cfm_loss unknown path", lambda: training.cfm_loss(mlp(), X, Y, 0.5, path="flow"), ValueError,
     ("path", PATH_NAMES)),
    ("cfm_loss x1 nan", lambda: training.cfm_loss(mlp(), X, NAN, 0.5), ValueError, ("x1", "NaN")),
    ("cfm_loss data on meta, model on cpu", lambda: training.cfm_loss(mlp(), META, META, 0.5), ValueError,
     ("model", "meta", "cpu")),
    ("cfm_loss model not callable", lambda: training.cfm_loss("mlp", X, Y, 0.5), TypeError, ("model",)),
    ("cfm_loss y wrong batch", lambda: training.cfm_loss(cond(), X, Y, 0.5, y=labels(0, 1)), ValueError, ("y",)),
    ("train model not a Module", lambda: training.train("mlp", X), TypeError, ("model",)),
    ("train no data", lambda: training.train(mlp()), ValueError, ("data", "pairs")),
    ("train data a str", lambda: train("moons"), TypeError, ("data",)),
    ("train data nan", lambda: train(NAN), ValueError, ("data", "NaN")),
    ("train data dim != model dim", lambda: train(torch.randn(16, 3)), ValueError, ("data", "(3,)", "(2,)")),
    ("train data on meta", lambda: train(META), ValueError, ("data", "meta")),
    ("train steps = 0", lambda: train(steps=0), ValueError, ("steps",)),
    ("train steps < 0", lambda: train(steps=-5), ValueError, ("steps",)),
    ("train steps float", lambda: train(steps=10.0), TypeError, ("steps",)),
    ("train batch_size = 0", lambda: train(batch_size=0), ValueError, ("batch_size",)),
    ("train lr = 0", lambda: train(lr=0.0), ValueError, ("lr",)),
    ("train lr nan", lambda: train(lr=float("nan")), ValueError, ("lr", "finite")),
    ("train unknown coupling", lambda: train(coupling="sinkhorn"), ValueError, ("coupling", "independent, ot")),
    ("train unknown path", lambda: train(path="edm"), ValueError, ("path", PATH_NAMES)),
    ("train ema_decay = 1", lambda: train(ema_decay=1.0), ValueError, ("ema_decay",)),
    ("train label_dropout = 1", lambda: train(label_dropout=1.0), ValueError, ("label_dropout",)),
    ("train grad_clip = 0", lambda: train(grad_clip=0.0), ValueError, ("grad_clip",)),
    ("train weight_decay < 0", lambda: train(weight_decay=-1e-4), ValueError, ("weight_decay",)),
    ("train amp unknown", lambda: train(amp="fp8"), ValueError, ("amp",)),
    ("train seed float", lambda: train(seed=1.5), TypeError, ("seed",)),
    ("train check_every = 0", lambda: train(check_every=0), ValueError, ("check_every",)),
    ("train checkpoint_every without path", lambda: train(checkpoint_every=5), ValueError, ("checkpoint_every",)),
    ("train checkpoint not a path", lambda: train(checkpoint=123), TypeError, ("checkpoint",)),
    ("train unknown ddp_batches", lambda: train(ddp_batches="all"), ValueError, ("ddp_batches", "per_rank")),
    ("train unknown device", lambda: train(device="tpu"), ValueError, ("device",)),
    ("train cuda without cuda", lambda: train(device="cuda"), ValueError, ("device", "CUDA")),
    ("train labels without num_classes", lambda: train((X, labels(0, 1, 0, 1))), ValueError, ("num_classes",)),
    ("train labels out of range", lambda: train((X, labels(0, 1, 2, 3)), model=cond()), ValueError,
     ("labels y", "[0, 2]")),
    ("train labels float", lambda: train((X, torch.zeros(4)), model=cond()), TypeError, ("data[1] (y)",)),
    ("train labels wrong length", lambda: train((X, labels(0, 1)), model=cond()), TypeError, ("data[1] (y)",)),
    ("train pairs mismatch", lambda: training.train(mlp(), pairs=(X, X5), steps=1, progress=False), ValueError,
     ("pairs[0] (x0)", "pairs[1] (x1)")),
    ("train pairs with ot coupling", lambda: training.train(mlp(), pairs=(X, Y), coupling="ot", steps=1,
                                                            progress=False), ValueError, ("coupling",)),
    ("train checkpoint of another config", ckpt_other_config, ValueError, ("hidden", "checkpoint has 8")),
    # --- solvers -------------------------------------------------------------------------------
    ("odeint v not callable", lambda: solvers.odeint("v", X), TypeError, ("v",)),
    ("odeint unknown method", lambda: solvers.odeint(field, X, method="rk45"), ValueError, ("method", METHODS)),
    ("odeint steps = 0", lambda: solvers.odeint(field, X, steps=0), ValueError, ("steps",)),
    ("odeint steps < 0", lambda: solvers.odeint(field, X, steps=-3), ValueError, ("steps",)),
    ("odeint t0 < 0", lambda: solvers.odeint(field, X, -0.5), ValueError, ("t0", "[0.0, 1.0]")),
    ("odeint t1 > 1", lambda: solvers.odeint(field, X, 0.0, 1.5), ValueError, ("t1", "[0.0, 1.0]")),
    ("odeint x nan", lambda: solvers.odeint(field, NAN), ValueError, ("x", "NaN")),
    ("odeint x unbatched", lambda: solvers.odeint(field, X[0]), ValueError, ("x", "batch")),
    ("odeint atol = 0 (adaptive)", lambda: solvers.odeint(field, X, method="dopri5", atol=0.0), ValueError,
     ("atol",)),
    ("odeint model on cpu, x on meta", lambda: solvers.odeint(mlp(), META), ValueError, ("x", "meta", "cpu")),
    ("odeint labels out of range", lambda: solvers.odeint(cond(), X, steps=2, y=labels(0, 1, 2, 4)), ValueError,
     ("y", "[0, 3]")),
    ("sample neither n nor x0", lambda: solvers.sample(mlp()), ValueError, ("n", "x0")),
    ("sample n = 0", lambda: solvers.sample(mlp(), 0), ValueError, ("n",)),
    ("sample n != len(x0)", lambda: solvers.sample(mlp(), 5, x0=X), ValueError, ("n=5", "x0")),
    ("sample unknown method", lambda: solvers.sample(mlp(), 4, method="heun3"), ValueError, ("method", METHODS)),
    ("sample NFE (steps) = 0", lambda: solvers.sample(mlp(), 4, steps=0), ValueError, ("steps",)),
    ("sample unknown path", lambda: solvers.sample(mlp(), 4, path="diffusion"), ValueError, ("path", PATH_NAMES)),
    ("sample shape unknown", lambda: solvers.sample(field, 4), ValueError, ("x0",)),
    ("sample model not callable", lambda: solvers.sample("mlp", 4), TypeError, ("model",)),
    ("sample bad generator", lambda: solvers.sample(mlp(), 4, generator=1), TypeError, ("generator",)),
    ("sample x0 wrong dim", lambda: solvers.sample(mlp(), x0=X3D), ValueError, ("x", "(batch, 2)")),
    ("sdeint unknown path", lambda: solvers.sdeint(field, X, "edm"), ValueError, ("path", PATH_NAMES)),
    ("sdeint steps = 0", lambda: solvers.sdeint(field, X, "condot", steps=0), ValueError, ("steps",)),
    ("sdeint g < 0", lambda: solvers.sdeint(field, X, "condot", g=-1.0), ValueError, ("g",)),
    ("sdeint t0 >= t1", lambda: solvers.sdeint(field, X, "condot", 0.5, 0.2), ValueError, ("t0", "t1")),
    ("sdeint x nan", lambda: solvers.sdeint(field, NAN, "condot"), ValueError, ("x", "NaN")),
    # --- likelihood ----------------------------------------------------------------------------
    ("divergence v not callable", lambda: likelihood.divergence(None, X, 0.5), TypeError, ("v",)),
    ("divergence unknown method", lambda: likelihood.divergence(field, X, 0.5, method="trace"), ValueError,
     ("divergence method", "exact, hutchinson")),
    ("divergence t > 1", lambda: likelihood.divergence(field, X, 1.5), ValueError, ("t",)),
    ("divergence probes shape", lambda: likelihood.divergence(field, X, 0.5, method="hutchinson",
                                                              probes=torch.ones(2, 5, 2)), ValueError, ("probes",)),
    ("gaussian_log_prob scale = 0", lambda: likelihood.gaussian_log_prob(X, 0.0), ValueError, ("scale",)),
    ("gaussian_log_prob x not a tensor", lambda: likelihood.gaussian_log_prob([1.0, 2.0]), TypeError, ("x",)),
    ("log_prob v not callable", lambda: likelihood.log_prob(1, X), TypeError, ("v",)),
    ("log_prob unknown method", lambda: likelihood.log_prob(field, X, method="rk23"), ValueError,
     ("method", METHODS)),
    ("log_prob steps = 0", lambda: likelihood.log_prob(field, X, method="euler", steps=0), ValueError, ("steps",)),
    ("log_prob unknown divergence", lambda: likelihood.log_prob(field, X, divergence="skilling"), ValueError,
     ("divergence", "exact, hutchinson")),
    ("log_prob n_probes = 0", lambda: likelihood.log_prob(field, X, divergence="hutchinson", n_probes=0),
     ValueError, ("n_probes",)),
    ("log_prob unknown path", lambda: likelihood.log_prob(field, X, path="rf"), ValueError, ("path", PATH_NAMES)),
    ("log_prob x1 inf", lambda: likelihood.log_prob(field, INF), ValueError, ("x", "infinite")),
    ("log_prob rtol < 0", lambda: likelihood.log_prob(field, X, rtol=-1.0), ValueError, ("rtol",)),
    ("log_prob model on cpu, x1 on meta", lambda: likelihood.log_prob(mlp(), META), ValueError, ("meta", "cpu")),
    ("sample_with_log_prob atol = 0", lambda: likelihood.sample_with_log_prob(field, X, atol=0.0), ValueError,
     ("atol",)),
    ("sample_with_log_prob steps = 0", lambda: likelihood.sample_with_log_prob(field, X, method="rk4", steps=0),
     ValueError, ("steps",)),
    # --- datasets ------------------------------------------------------------------------------
    ("get_dataset unknown name", lambda: datasets.get_dataset("mnist"), ValueError,
     ("dataset", "8gaussians, gmm, moons, checkerboard, spirals, circles")),
    ("get_dataset unknown kwarg", lambda: datasets.get_dataset("moons", width=2), TypeError, ("width",)),
    ("dataset sampler n = 0", lambda: datasets.get_dataset("moons")(0), ValueError, ("n",)),
    ("dataset sampler n float", lambda: datasets.get_dataset("spirals")(10.0), TypeError, ("n",)),
    ("dataset sampler bad generator", lambda: datasets.get_dataset("circles")(4, generator=0), TypeError,
     ("generator",)),
    ("get_dataset noise < 0", lambda: datasets.get_dataset("moons", noise=-0.1), ValueError, ("noise",)),
    ("eight_gaussians std < 0", lambda: datasets.eight_gaussians(std=-1.0), ValueError, ("std",)),
    ("eight_gaussians radius nan", lambda: datasets.eight_gaussians(radius=float("nan")), ValueError, ("radius",)),
    ("load_digits unknown device", lambda: datasets.load_digits(device="tpu"), ValueError, ("device",)),
    # --- metrics -------------------------------------------------------------------------------
    ("w2 dim mismatch", lambda: metrics.w2(X, X3D), ValueError, ("a", "b", "dimension")),
    ("w2 nan", lambda: metrics.w2(NAN, Y), ValueError, ("a", "NaN")),
    ("w2 1-d", lambda: metrics.w2(X[0], Y), ValueError, ("a",)),
    ("w2 empty", lambda: metrics.w2(torch.zeros(0, 2), Y), ValueError, ("empty",)),
    ("mmd bandwidth = 0", lambda: metrics.mmd(X, Y, bandwidths=(0.0,)), ValueError, ("bandwidth",)),
    ("mmd one sample", lambda: metrics.mmd(X[:1], Y), ValueError, ("two samples",)),
    ("mmd devices", lambda: metrics.mmd(X, META), ValueError, ("b", "meta")),
    ("bits_per_dim dim = 0", lambda: metrics.bits_per_dim(1.0, 0), ValueError, ("dim",)),
    ("bits_per_dim nll a str", lambda: metrics.bits_per_dim("1.0", 2), TypeError, ("nll_nats",)),
    ("straightness 2-d trajectory", lambda: metrics.straightness(X), ValueError, ("trajectory",)),
    ("straightness times length", lambda: metrics.straightness(TRAJ, torch.linspace(0, 1, 5)), ValueError,
     ("times", "6")),
    ("straightness times not monotone", lambda: metrics.straightness(TRAJ, torch.tensor([0, .2, .1, .5, .7, 1.])),
     ValueError, ("times", "increasing")),
    # --- checkpoint ----------------------------------------------------------------------------
    ("save_checkpoint state not a dict", lambda tmp: checkpoint.save_checkpoint(tmp / "a.pt", [1]), TypeError,
     ("state",)),
    ("save_checkpoint path an int", lambda: checkpoint.save_checkpoint(3, {}), TypeError, ("path",)),
    ("save_checkpoint unloadable object", lambda tmp: checkpoint.save_checkpoint(tmp / "a.pt", {"f": field}),
     TypeError, ("state['f']", "weights_only")),
    ("load_checkpoint missing file", lambda tmp: checkpoint.load_checkpoint(tmp / "none.pt"), FileNotFoundError,
     ("none.pt",)),
    ("load_checkpoint path an int", lambda: checkpoint.load_checkpoint(3), TypeError, ("path",)),
    ("load_checkpoint garbage", garbage_file, ValueError, ("garbage.pt", "not a readable")),
    ("load_model without config", no_config, ValueError, ("plain.pt", "not a training checkpoint")),
    ("check_config differing key", lambda: checkpoint.check_config({"hidden": 8}, {"hidden": 16}), ValueError,
     ("hidden", "16", "8")),
    # --- device --------------------------------------------------------------------------------
    ("get_device unknown", lambda: device.get_device("tpu"), ValueError, ("device", "'tpu'")),
    ("get_device cuda unavailable", lambda: device.get_device("cuda:0"), ValueError, ("device", "CUDA")),
    ("seed_everything str", lambda: device.seed_everything("0"), TypeError, ("seed",)),
    ("seed_everything negative", lambda: device.seed_everything(-1), ValueError, ("seed",)),
    # --- flows ---------------------------------------------------------------------------------
    ("AffineCouplingFlow dim = 1", lambda: flows.AffineCouplingFlow(dim=1), ValueError, ("dim",)),
    ("AffineCouplingFlow n_layers = 0", lambda: flows.AffineCouplingFlow(n_layers=0), ValueError, ("n_layers",)),
    ("AffineCoupling mask all ones", lambda: flows.AffineCoupling(torch.ones(2)), ValueError, ("mask",)),
    ("flow.log_prob wrong dim", lambda: flow().log_prob(X3D), ValueError, ("x", "(batch, 2)")),
    ("flow.log_prob nan", lambda: flow().log_prob(NAN), ValueError, ("x", "NaN")),
    ("flow.log_prob on meta", lambda: flow().log_prob(META), ValueError, ("x", "meta")),
    ("flow.inverse float64", lambda: flow().inverse(X.double()), TypeError, ("z", "float64")),
    ("flow.sample n = 0", lambda: flow().sample(0), ValueError, ("n",)),
    ("train_flow not a flow", lambda: flows.train_flow(mlp(), X), TypeError, ("flow",)),
    ("train_flow steps = 0", lambda: flows.train_flow(flow(), X, steps=0), ValueError, ("steps",)),
    ("train_flow data wrong dim", lambda: flows.train_flow(flow(), X3D), ValueError, ("data", "(batch, 2)")),
    # --- second pass: silent wrong answers and errors from inside torch (reliability) ---------------
    ("train model output (batch, 1)", lambda: train(model=Narrow()), ValueError, ("model returned shape", "(4, 1)")),
    ("cfm_loss model output (batch, 1)", lambda: training.cfm_loss(Narrow(), X, Y, 0.5), ValueError,
     ("model returned shape", "(4, 1)")),
    ("train_step model output (batch, 1)", lambda: training.train_step(
        Narrow(), torch.optim.Adam(Narrow().parameters()), (X, Y, torch.rand(4))), ValueError, ("model returned shape",)),
    ("cfm_loss vp at t = 1", lambda: training.cfm_loss(mlp(), X, Y, 1.0, path="vp"), ValueError, ("t_max", "0.999")),
    ("vp target at t = 1", lambda: paths.VPPath().target(X, Y, 1.0), ValueError, ("t_max",)),
    ("vp sample at t = 1", lambda: paths.VPPath().sample(X, Y, 1.0), ValueError, ("t_max",)),
    ("train float64 data, float32 model", lambda: train(X.double()), TypeError, ("data", "float64", "float32")),
    ("train float64 sampler", lambda: train(sampler_float64), TypeError, ("data", "float64", ".to(")),
    ("train float64 pairs", lambda: training.train(mlp(), pairs=(X.double(), Y.double()), steps=1, progress=False),
     TypeError, ("pairs", "float64")),
    ("train float64 labelled data", lambda: train((X.double(), labels(0, 1, 0, 1)), model=cond()), TypeError,
     ("data[0] (x1)", "float64")),
    ("cfm_loss float64 data, float32 model", lambda: training.cfm_loss(mlp(), X.double(), Y.double(), 0.5),
     TypeError, ("x1", "float64", "float32")),
    ("cfm_loss mixed dtypes", lambda: training.cfm_loss(mlp(), X, Y.double(), 0.5), TypeError, ("x0", "x1", "float64")),
    ("train_cnf float64 data", lambda: likelihood.train_cnf(mlp(), X.double(), steps=1, batch_size=4), TypeError,
     ("data", "float64")),
    ("train_cnf sampler without generator", lambda: likelihood.train_cnf(mlp(), sampler_without_generator, steps=1,
                                                                        batch_size=4), TypeError,
     ("data", "generator")),
    ("log_prob float64 points, float32 model", lambda: likelihood.log_prob(mlp(), X.double()), TypeError,
     ("x", "float64")),
    ("sample_with_log_prob float64", lambda: likelihood.sample_with_log_prob(mlp(), X.double()), TypeError,
     ("x", "float64")),
    ("train_flow float64 data", lambda: flows.train_flow(flow(), X.double(), steps=1), TypeError, ("data", "float64")),
    ("train_flow sampler returns numpy", lambda: flows.train_flow(flow(), sampler_numpy, steps=1), TypeError,
     ("data", "torch.Tensor")),
    ("train sampler without generator", lambda: train(sampler_without_generator), TypeError,
     ("data", "generator=g", "(n, ...)")),
    ("train sampler returns numpy", lambda: train(sampler_numpy), TypeError, ("data", "torch.Tensor", "from_numpy")),
    ("train sampler wrong width", lambda: train(sampler_wide), ValueError, ("data", "(3,)", "(2,)")),
    ("train sampler empty", lambda: train(sampler_empty), ValueError, ("data", "(0, 2)")),
    ("train empty tensor", lambda: train(torch.zeros(0, 2)), ValueError, ("data", "empty")),
    ("train checkpoint is a folder", ckpt_is_a_folder, ValueError, ("is a folder",)),
    ("load_checkpoint a folder", load_folder, ValueError, ("is a folder",)),
    ("load_model in a missing folder", load_in_missing_folder, FileNotFoundError, ("run.pt", "does not exist")),
    ("load_model of a model cfmlib did not build", foreign_checkpoint, ValueError, ("resnet.pt", "'resnet'", "mlp")),
    ("train resumes a file not written by train", resume_foreign_file, ValueError, ("other.pt", "not written by")),
    ("get_dataset unknown kwarg lists valid", lambda: datasets.get_dataset("moons", sigma=0.1), TypeError,
     ("sigma", "noise")),
    ("get_dataset kwarg of another set", lambda: datasets.get_dataset("checkerboard", noise=0.1), TypeError,
     ("noise", "valid ones: none")),
    ("get_path unknown kwarg lists valid", lambda: paths.get_path("vp", sigma_min=0.1), TypeError,
     ("sigma_min", "beta_min", "beta_max")),
    ("build_model unknown config key", lambda: models.build_model({"kind": "mlp", "width": 3}), TypeError,
     ("width", "hidden")),
    ("get_path 'ot' is a coupling", lambda: paths.get_path("ot"), ValueError, ("coupling", "condot")),
    ("get_coupling 'condot' is a path", lambda: couplings.get_coupling("condot"), ValueError, ("path", "coupling='ot'")),
    ("Batches labels with dropout, no num_classes", lambda: next(training.Batches((X, labels(0, 1, 0, 1)), 4,
                                                                                 label_dropout=0.5)),
     ValueError, ("num_classes",)),
    ("train_step batch of 2", lambda: training.train_step(mlp(), torch.optim.Adam(mlp().parameters()), (X, Y)),
     TypeError, ("batch",)),
    ("data_band tensor too small", lambda: metrics.data_band(X, 3), ValueError, ("data", "2 n")),
    ("data_band repeats = 1", lambda: metrics.data_band(X, 2, repeats=1), ValueError, ("repeats",)),
    ("data_band unknown metric", lambda: metrics.data_band(X, 2, metric="w1"), ValueError, ("metric", "w2", "mmd")),
    ("compare_runs nan", lambda: metrics.compare_runs([1.0, float("nan")], [1.0]), ValueError, ("a", "NaN")),
]


# rows for parts of the library that may not be there in every checkout (added by later work)
OPTIONAL = {"UNet": lambda: hasattr(models, "UNet"), "sdeint": lambda: hasattr(solvers, "sdeint"),
            "CFGField": lambda: hasattr(models, "CFGField"), "guided": lambda: hasattr(models, "guided"),
            "train unknown ddp_batches": lambda: "ddp_batches" in inspect.signature(training.train).parameters}


def _param(row):
    marks = [pytest.mark.skipif(not there(), reason=f"{key} is not in this version of cfmlib")
             for key, there in OPTIONAL.items() if row[0].startswith(key)]
    return pytest.param(*row[1:], id=row[0], marks=marks)


@pytest.mark.parametrize("call, exc, substrings", [_param(r) for r in ROWS])
def test_bad_input_is_reported_clearly(call, exc, substrings, tmp_path):
    with pytest.raises(exc) as info:
        call(tmp_path) if call.__code__.co_argcount else call()
    msg = str(info.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in the message: {msg}"
    # a clear message is a sentence of our own, not a torch internal one
    assert "Tensor.item() cannot be called on meta" not in msg and "size of tensor a" not in msg


def test_ids_are_unique():
    ids = [r[0] for r in ROWS]
    assert len(ids) == len(set(ids))
