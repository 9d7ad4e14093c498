"""Training: the loss is the CFM loss, the loop learns two moons, labels and pairs work."""
import pytest
import torch

import cfmlib
from cfmlib.metrics import w2
from cfmlib.models import MLP
from cfmlib.paths import get_path
from cfmlib.training import cfm_loss, train


def test_cfm_loss_matches_definition():
    torch.manual_seed(0)
    model = MLP(2, hidden=32, depth=2)
    x0, x1, t = torch.randn(64, 2), torch.randn(64, 2), torch.rand(64)
    for name in ("condot", "vp", "cosine", "ve"):
        path = get_path(name)
        xt, ut = path.sample(x0, x1, t)
        expected = ((model(xt, t) - ut) ** 2).sum(1).mean()
        assert torch.allclose(cfm_loss(model, x0, x1, t, path=name), expected)


def test_two_moons_learned():
    """A small seeded budget gets clearly closer to the data than the noise is."""
    torch.manual_seed(0)
    data = cfmlib.get_dataset("moons")
    res = train(MLP(2, hidden=128), data, steps=600, batch_size=256, progress=False, seed=0)
    g = torch.Generator().manual_seed(1)
    x1 = data(1000, generator=g)
    samples = cfmlib.sample(res.ema, 1000, steps=50, generator=g).x
    noise = torch.randn(1000, 2, generator=g)
    d_model, d_noise = w2(samples, x1), w2(noise, x1)
    assert d_model < 0.6 * d_noise, (d_model, d_noise)
    assert len(res.history) == 600 and res.history[-1] < res.history[0]


def test_class_conditional_and_pairs(monkeypatch):
    from cfmlib.paths import AffinePath

    x1 = torch.randn(200, 2)
    y = (x1[:, 0] > 0).long()
    res = train(MLP(2, hidden=16, depth=1, num_classes=2), (x1, y), steps=20, batch_size=32, progress=False)
    assert len(res.history) == 20
    x, t = torch.randn(8, 2), torch.full((8,), 0.5)
    with torch.no_grad():  # the label embedding was trained: labels change the field
        assert not torch.allclose(res.model(x, t, torch.zeros(8, dtype=torch.long)),
                                  res.model(x, t, torch.ones(8, dtype=torch.long)))

    # fixed pairs are drawn together, never re-paired: here x1 - x0 = 5 for every pair
    x0 = torch.randn(200, 2)
    seen = []
    real_loss = AffinePath.loss

    def spy(self, model, a, b, t, y=None, weight=None):
        seen.append((b - a).detach().clone())
        return real_loss(self, model, a, b, t, y, weight)

    monkeypatch.setattr(AffinePath, "loss", spy)
    res = train(MLP(2, hidden=16, depth=1), pairs=(x0, x0 + 5.0), steps=5, batch_size=32, progress=False)
    assert len(res.history) == 5 and len(seen) == 5
    assert all(torch.allclose(d, torch.full_like(d, 5.0), atol=1e-5) for d in seen)


def test_ema_tracks_model():
    res = train(MLP(2, hidden=16, depth=1), cfmlib.get_dataset("moons"), steps=20, batch_size=32,
                ema_decay=0.0, progress=False)
    for p, q in zip(res.model.parameters(), res.ema.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["condot", "vp", "cosine", "ve"])
def test_training_points_follow_the_path(name, monkeypatch):
    """The loop trains on x_t ~ p_t(. | x1) = N(alpha_t x1, sigma_t^2 I): noise is standard normal
    and the schedule is applied once (a source-scaled x0 would blow up the VE path)."""
    from cfmlib.paths import AffinePath

    path = get_path(name)
    seen = []
    real_loss = AffinePath.loss

    def spy(self, model, x0, x1, t, y=None, weight=None):
        seen.append((x0.detach().clone(), x1.detach().clone(), t.detach().clone()))
        return real_loss(self, model, x0, x1, t, y, weight)

    monkeypatch.setattr(AffinePath, "loss", spy)
    x1 = torch.zeros(4096, 2)
    train(MLP(2, hidden=8, depth=1), x1, path=name, steps=1, batch_size=4096, progress=False)
    x0, x1b, t = seen[0]
    assert abs(float(x0.std()) - 1.0) < 0.03  # standard-normal noise whatever the path
    xt = path.sample_xt(x0, x1b, t)  # data at 0: x_t = sigma_t x0, so x_t / sigma_t ~ N(0, I)
    z = xt / path.sigma(t)[:, None]
    assert abs(float(z.std()) - 1.0) < 0.03


def test_ema_without_averaging_is_the_model_in_every_checkpoint(tmp_path):
    """With ema_decay=0 the EMA is copied from the model only when it is read (checkpoints, the end):
    every checkpoint must still hold ema == model."""
    ck = tmp_path / "ck.pt"
    train(MLP(2, hidden=16, depth=1), cfmlib.get_dataset("moons"), steps=7, batch_size=32, ema_decay=0.0,
          progress=False, checkpoint=ck, checkpoint_every=7)
    state = torch.load(ck, weights_only=False)
    assert state["step"] == 7
    for k, v in state["model"].items():
        assert torch.equal(v, state["ema"][k])


def test_last_step_prepares_no_coupling():
    """The OT coupling of the next batch is solved ahead, except after the last step (no work is left
    running in the background when train returns)."""
    import cfmlib.training as tr

    gen = torch.Generator().manual_seed(0)
    b = tr.Batches(cfmlib.get_dataset("moons"), 64, path="condot", coupling="ot", generator=gen)
    b.next()
    assert b._pending is not None
    b.next(ahead=False)
    assert b._pending is None
