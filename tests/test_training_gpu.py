"""GPU-only paths of cfmlib.train (skipped without CUDA): autocast, CUDA generators,
device-resident loss history, and checkpoints moving between GPU and CPU."""
import warnings

import pytest
import torch

import cfmlib
from cfmlib import checkpoint, models, solvers

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _digits():
    x, y = cfmlib.datasets.load_digits()
    return x[:256], y[:256]


@cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_trains_with_fp32_loss(amp):
    torch.manual_seed(0)
    m = models.UNet((1, 8, 8), base=16, num_classes=10)
    res = cfmlib.train(m, _digits(), steps=60, batch_size=64, amp=amp, progress=False)
    assert next(res.model.parameters()).device.type == "cuda"
    assert next(res.model.parameters()).dtype == torch.float32  # weights stay fp32 under autocast
    h = torch.tensor(res.history)
    assert torch.isfinite(h).all() and h[-20:].mean() < h[:5].mean()


@cuda
def test_cuda_generator_is_seeded_and_reproducible():
    def run():
        torch.manual_seed(0)
        return cfmlib.train(models.MLP(2, 64, 2), cfmlib.get_dataset("moons"), steps=30, batch_size=128,
                            progress=False, seed=5).history
    a, b = torch.tensor(run()), torch.tensor(run())
    assert torch.allclose(a, b, rtol=1e-4, atol=0)  # same seed, same draws on the CUDA generator


@cuda
def test_sampling_stays_on_the_gpu():
    torch.manual_seed(0)
    m = models.UNet((1, 8, 8), base=8, time_features=16, num_classes=10).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = solvers.sample(models.guided(m, 2.0), 8, generator=g, steps=4, y=torch.arange(8, device="cuda"))
    assert out.x.device.type == "cuda" and out.nfe == 4


@cuda
def test_gpu_checkpoint_loads_on_cpu_and_resumes_there(tmp_path):
    torch.manual_seed(0)
    ck = tmp_path / "gpu.pt"
    m = models.UNet((1, 8, 8), base=8, time_features=16, num_classes=10)
    cfmlib.train(m, _digits(), steps=10, batch_size=32, checkpoint=ck, progress=False, device="cuda")
    cpu_model = checkpoint.load_model(ck, map_location="cpu")
    assert next(cpu_model.parameters()).device.type == "cpu"
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([1, 2])
    gpu_model = checkpoint.load_model(ck, map_location="cuda")
    assert torch.allclose(cpu_model(x, 0.5, y), gpu_model(x.cuda(), 0.5, y.cuda()).cpu(), atol=1e-4)
    # resuming a GPU run on the CPU works; the CUDA random stream cannot carry over, so it warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = cfmlib.train(models.build_model(cpu_model.config), _digits(), steps=15, batch_size=32,
                           checkpoint=ck, progress=False, device="cpu")
    assert res.steps == 5 and len(res.history) == 15
    assert any("random stream" in str(w.message) for w in caught)


@cuda
def test_compiled_training_on_gpu():
    torch.manual_seed(0)
    res = cfmlib.train(models.MLP(2, 64, 2), cfmlib.get_dataset("moons"), steps=20, batch_size=128,
                       compile=True, progress=False)
    assert torch.isfinite(torch.tensor(res.history)).all()
