"""Bad fields and bad solver arguments are reported before they silently broadcast or fail in torch."""
import pytest
import torch

from cfmlib.likelihood import divergence
from cfmlib.metrics import mmd
from cfmlib.models import MLP
from cfmlib.solvers import odeint, sample, sdeint


def wrong_shape(x, t):
    return x[:, :1]  # (batch, 1) would broadcast against a (batch, 2) state


x = torch.randn(4, 2)

ROWS = [
    ("odeint field of the wrong shape", lambda: odeint(wrong_shape, x, steps=2), ValueError, "v must return"),
    ("odeint t0 == t1", lambda: odeint(lambda x, t: x, x, 0.5, 0.5, method="dopri5"), ValueError, "t0 and t1"),
    ("sample float64 noise, float32 model", lambda: sample(MLP(2, hidden=4, depth=1), x0=x.double(), steps=2),
     TypeError, "x has dtype"),
    ("sdeint bad generator", lambda: sdeint(MLP(2, hidden=4, depth=1), x, "condot", steps=2, generator=5),
     TypeError, "generator"),
    ("sdeint float64 state, float32 model", lambda: sdeint(MLP(2, hidden=4, depth=1), x.double(), "condot", steps=2),
     TypeError, "x has dtype"),
    ("divergence field of the wrong shape", lambda: divergence(wrong_shape, x, 0.5), ValueError, "v must return"),
    ("divergence unbatched x", lambda: divergence(lambda x, t: x, torch.randn(2), 0.5), ValueError, "x must be batched"),
    ("mmd empty bandwidths", lambda: mmd(x, x, bandwidths=()), ValueError, "bandwidths"),
]


@pytest.mark.parametrize("call,exc,text", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_reported_clearly(call, exc, text):
    with pytest.raises(exc, match=text):
        call()


def test_float64_model_samples_in_float64():
    model = MLP(2, hidden=4, depth=1).double()
    assert sample(model, 3, steps=2).x.dtype == torch.float64
