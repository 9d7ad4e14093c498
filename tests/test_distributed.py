"""cfmlib.train under torch.distributed: two CPU processes with the Gloo backend.

With ``ddp_batches='global'`` every rank draws the same global batch and trains on its half,
and DistributedDataParallel averages the two half-batch gradients, which equals the gradient
of the global mean loss.  So a 2-process run must match single-process training on the same
global batch up to floating-point rounding: in float64 after 20 Adam steps we require the
weights and the EMA to agree within 1e-9 (absolute), and the loss history, which train keeps
in float32, within 1e-6 (relative).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cfmlib
from cfmlib import checkpoint, models

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the Gloo backend is not available")

TOL = 1e-9
SETTINGS = dict(steps=20, batch_size=64, lr=1e-2, ema_decay=0.9, seed=3, device="cpu", progress=False)


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(512, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5], dtype=torch.float64)


def _model(init_seed):
    torch.manual_seed(init_seed)
    return models.MLP(dim=2, hidden=32, depth=2).double()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(result):
    return {"params": [p.detach().clone() for p in result.model.parameters()],
            "ema": [p.detach().clone() for p in result.ema.parameters()],
            "history": torch.tensor(result.history, dtype=torch.float64)}


def _worker(rank, world, port, tmp):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        # every rank initialises differently: train must start all ranks from rank 0's weights
        r = cfmlib.train(_model(100 + rank), _data(), ddp_batches="global", **SETTINGS)
        out["global"] = _state(r)
        r = cfmlib.train(_model(100 + rank), _data(), ddp_batches="per_rank",
                         checkpoint=os.path.join(tmp, "full.pt"), **SETTINGS)
        out["per_rank"] = _state(r)
        # the same run interrupted after 10 steps and resumed from its checkpoint
        half = dict(SETTINGS, steps=10)
        cfmlib.train(_model(100 + rank), _data(), ddp_batches="per_rank", checkpoint=os.path.join(tmp, "part.pt"), **half)
        r = cfmlib.train(_model(200 + rank), _data(), ddp_batches="per_rank",
                         checkpoint=os.path.join(tmp, "part.pt"), **SETTINGS)
        out["resumed"] = _state(r)
        try:
            cfmlib.train(_model(0), _data(), **dict(SETTINGS, batch_size=63))
        except ValueError as exc:
            out["bad_batch"] = str(exc)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return tmp, ranks


def _maxdiff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_global_batches_match_single_process(runs):
    _, ranks = runs
    single = _state(cfmlib.train(_model(100), _data(), **SETTINGS))
    for r in ranks:
        assert _maxdiff(r["global"]["params"], single["params"]) < TOL
        assert _maxdiff(r["global"]["ema"], single["ema"]) < TOL
        assert torch.allclose(r["global"]["history"], single["history"], rtol=1e-6, atol=0)
    assert len(single["history"]) == SETTINGS["steps"]


def test_ranks_stay_identical(runs):
    _, (r0, r1) = runs
    for mode in ("global", "per_rank", "resumed"):
        assert all(torch.equal(a, b) for a, b in zip(r0[mode]["params"], r1[mode]["params"])), mode
        assert all(torch.equal(a, b) for a, b in zip(r0[mode]["ema"], r1[mode]["ema"])), mode
        assert torch.equal(r0[mode]["history"], r1[mode]["history"]), mode


def test_per_rank_batches_differ_from_global(runs):
    _, (r0, _) = runs
    assert _maxdiff(r0["per_rank"]["params"], r0["global"]["params"]) > 1e-6
    assert torch.isfinite(r0["per_rank"]["history"]).all()


def test_resume_under_ddp_is_exact(runs):
    _, (r0, _) = runs
    assert _maxdiff(r0["resumed"]["params"], r0["per_rank"]["params"]) == 0.0
    assert torch.equal(r0["resumed"]["history"], r0["per_rank"]["history"])


def test_checkpoint_written_once_and_loads_without_distributed(runs):
    tmp, (r0, _) = runs
    state = checkpoint.load_checkpoint(os.path.join(tmp, "full.pt"))
    assert state["step"] == SETTINGS["steps"] and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])  # seed + rank streams
    assert torch.allclose(state["history"].double(), r0["per_rank"]["history"])
    assert all(torch.equal(a, b) for a, b in zip(state["ema"].values(), r0["per_rank"]["ema"]))
    model = checkpoint.load_model(os.path.join(tmp, "full.pt"))  # rebuilt in float32 from the config
    assert all(torch.allclose(a.double(), b, atol=1e-6) for a, b in zip(model.parameters(), r0["per_rank"]["ema"]))
    leftovers = [f for f in os.listdir(tmp) if f.endswith(".tmp")]
    assert leftovers == []


def test_global_batch_must_divide_by_world_size(runs):
    _, (r0, _) = runs
    assert "divisible by the world size 2" in r0["bad_batch"]
