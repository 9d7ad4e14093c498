"""The small U-Net and the classifier-free guided field of cfmlib.models (chapter 9)."""
import pytest
import torch

import cfmlib
from cfmlib import checkpoint, models, solvers


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = models.UNet((1, 8, 8), base=8, time_features=16, num_classes=10).eval()
    # the last convolution of each block starts at zero; perturb every weight so that
    # labels and times visibly change the output in these tests
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 8, 12)])
def test_output_shape_matches_input(shape):
    m = models.UNet(shape, base=8, time_features=16)
    x = torch.randn(5, *shape)
    assert m(x, 0.3).shape == x.shape


def test_time_forms_agree(net):
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 3, 7, 10])
    a = net(x, 0.25, y)
    b = net(x, torch.full((4,), 0.25), y)
    c = net(x, torch.full((4, 1), 0.25), y)
    d = net(x, torch.tensor(0.25), y)
    assert torch.allclose(a, b) and torch.allclose(a, c) and torch.allclose(a, d)
    assert not torch.allclose(net(x, 0.75, y), a)


def test_null_label_is_the_default(net):
    x = torch.randn(3, 1, 8, 8)
    null = torch.full((3,), 10)
    assert torch.allclose(net(x, 0.5), net(x, 0.5, null))
    assert not torch.allclose(net(x, 0.5, torch.tensor([1, 2, 3])), net(x, 0.5))


def test_batch_elements_are_independent(net):
    x = torch.randn(6, 1, 8, 8)
    t = torch.rand(6)
    y = torch.randint(0, 11, (6,))
    full = net(x, t, y)
    assert torch.allclose(full[2:3], net(x[2:3], t[2:3], y[2:3]), atol=1e-5)


def test_guided_field_formula(net):
    x = torch.randn(5, 1, 8, 8)
    t = torch.rand(5)
    y = torch.tensor([0, 1, 2, 3, 4])
    w = 2.5
    expected = (1 + w) * net(x, t, y) - w * net(x, t, torch.full_like(y, 10))
    assert torch.allclose(models.guided(net, w)(x, t, y), expected, atol=1e-5)
    assert torch.allclose(models.CFGField(net, 0.0)(x, t, y), net(x, t, y))
    assert torch.allclose(models.guided(net, w)(x, 0.4, y), models.guided(net, w)(x, torch.full((5, 1), 0.4), y),
                          atol=1e-6)


def test_guided_field_samples_through_sample(net):
    field = models.guided(net, 1.0)
    y = torch.arange(4)
    out = solvers.sample(field, 4, steps=3, generator=torch.Generator().manual_seed(0), y=y)
    assert out.x.shape == (4, 1, 8, 8) and out.nfe == 3 and torch.isfinite(out.x).all()


def test_build_model_round_trip(net, tmp_path):
    again = models.build_model(net.config)
    assert isinstance(again, models.UNet) and again.config == net.config
    again.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(again(x, 0.1, torch.tensor([1, 2])), net(x, 0.1, torch.tensor([1, 2])))
    assert net.config["kind"] == "unet" and net.config["image_shape"] == (1, 8, 8)


def test_train_checkpoint_and_sample(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    m = models.UNet((1, 8, 8), base=8, time_features=16, num_classes=3)
    ck = tmp_path / "unet.pt"
    res = cfmlib.train(m, (x, y), steps=3, batch_size=8, progress=False, checkpoint=ck, device="cpu")
    assert len(res.history) == 3
    assert all(p.is_leaf and p.grad_fn is None for p in res.ema.parameters())  # EMA records no autograd graph
    loaded = checkpoint.load_model(ck)
    assert isinstance(loaded, models.UNet) and loaded.config == m.config
    out = solvers.sample(loaded, 2, steps=2)
    assert out.x.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(8, 8)), "image_shape"),
    (dict(image_shape=(1, 7, 8)), "even"),
    (dict(image_shape=(1, 8, 8), base=0), "base"),
    (dict(image_shape=(1, 8, 8), time_features=15), "time_features"),
    (dict(image_shape=(1, 8, 8), num_classes=0), "num_classes"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        models.UNet(**kwargs)


def test_bad_call_arguments(net):
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 1, 8, 9), 0.5)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 64), 0.5)
    with pytest.raises(ValueError, match="t must be"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="y must be"):
        net(torch.randn(2, 1, 8, 8), 0.5, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="y must be"):
        net(torch.randn(2, 1, 8, 8), 0.5, torch.tensor([1, 2, 3]))
    plain = models.UNet((1, 8, 8), base=8, time_features=16)
    with pytest.raises(ValueError, match="without num_classes"):
        plain(torch.randn(2, 1, 8, 8), 0.5, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class-conditional"):
        models.guided(plain, 1.0)
    with pytest.raises(ValueError, match="labels y"):
        models.guided(net, 1.0)(torch.randn(2, 1, 8, 8), 0.5)
    with pytest.raises(TypeError, match="w must be a number"):
        models.guided(net, "2")
