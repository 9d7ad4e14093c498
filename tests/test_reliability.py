"""Training never fails silently, checkpoints survive interruption, runs are reproducible,
argument checks stay out of inner loops, and unit tests cannot reach the network.

Everything is tiny (MLPs with 16 hidden units, batches of 32, a dozen steps) so that the
file runs in seconds; bitwise comparisons are on the CPU.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cfmlib import _checks, checkpoint, flows, models, paths, solvers, training
from cfmlib.training import NonFiniteLossError

SETTINGS = dict(steps=12, batch_size=32, lr=1e-2, ema_decay=0.9, device="cpu", progress=False, seed=5)


def _data(labels=False):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, 2, generator=g) * torch.tensor([2.0, 0.5])
    if labels:
        return x, torch.randint(0, 3, (256,), generator=g)
    return x


def _model(init=0, labels=False, hidden=16):
    torch.manual_seed(init)
    return models.MLP(dim=2, hidden=hidden, depth=2, num_classes=3 if labels else None)


def _assert_same_run(a, b):
    """Bitwise equality of model and EMA state dicts and of the loss history."""
    for sa, sb in ((a.model.state_dict(), b.model.state_dict()), (a.ema.state_dict(), b.ema.state_dict())):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a.history == b.history


def _step_in(message):
    m = re.search(r"at step (\d+)", message)
    assert m, message
    return int(m.group(1))


# --- a non-finite loss stops training, naming the first bad step -------------------------------------

def test_huge_learning_rate_stops_at_the_first_bad_step():
    with pytest.raises(NonFiniteLossError) as info:
        training.train(_model(), _data(), **dict(SETTINGS, lr=1e6))
    msg = str(info.value)
    k = _step_in(msg)
    assert k >= 2 and "loss" in msg and "lr=1000000.0" in msg and "grad_clip" in msg
    # the step is the *first* bad one: the same run stopped one step earlier is finite throughout
    ok = training.train(_model(), _data(), **dict(SETTINGS, lr=1e6, steps=k - 1))
    assert all(torch.isfinite(torch.tensor(ok.history)))


class _InfAt:
    """A sampler whose ``bad``-th call (1-based) returns data containing inf."""

    def __init__(self, bad):
        self.bad, self.calls = bad, 0

    def __call__(self, n, generator=None):
        self.calls += 1
        x = torch.randn(n, 2, generator=generator)
        if self.calls == self.bad:
            x[0, 0] = float("inf")
        return x


@pytest.mark.parametrize("check_every", [None, 5])
def test_inf_data_names_the_step_even_when_checking_rarely(check_every, tmp_path):
    path = tmp_path / "run.pt"
    with pytest.raises(NonFiniteLossError) as info:
        training.train(_model(), _InfAt(3), checkpoint=path, checkpoint_every=4, check_every=check_every,
                       **dict(SETTINGS, steps=8))
    msg = str(info.value)
    assert _step_in(msg) == 3
    assert "CFM loss became" in msg and "non-finite data" in msg
    # the model went bad at step 3, so the checkpoint due at step 4 must not have been written
    assert not path.exists()


def test_non_finite_loss_error_is_a_floating_point_error():
    assert issubclass(NonFiniteLossError, FloatingPointError)


# --- checkpoints are atomic --------------------------------------------------------------------------

def _equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    old = {"step": 1, "w": torch.arange(1000.0), "config": {"kind": "mlp"}}
    checkpoint.save_checkpoint(path, old)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of the file, then the disk fills up
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000), "config": {"kind": "mlp"}})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary file left behind
    _equal_states(checkpoint.load_checkpoint(path), old)
    _equal_states(torch.load(path, weights_only=True), old)


def test_interrupted_save_during_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    training.train(_model(), _data(), checkpoint=path, **dict(SETTINGS, steps=4))
    before = torch.load(path, weights_only=True)
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(_model(), _data(), checkpoint=path, **dict(SETTINGS, steps=8))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]
    after = torch.load(path, weights_only=True)
    assert after["step"] == before["step"] == 4
    for k in before["model"]:
        assert torch.equal(before["model"][k], after["model"][k])


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from cfmlib import checkpoint
    path = sys.argv[1]
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.ones(10_000)})
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04" + b"\\x00" * 4096)
        f.flush()
        print("WRITING", flush=True)
        time.sleep(120)  # killed here, in the middle of the write
        real_save(obj, f, *args, **kwargs)

    torch.save = slow_save
    checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(10_000)})
""")


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the second save is half written
        assert line.strip() == "WRITING", proc.stderr.read()
        temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
        assert temps, "the second save should be writing to a temporary file"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(10_000))
    # a later save still works next to the killed run's leftover temporary file
    checkpoint.save_checkpoint(path, {"step": 3, "w": torch.zeros(3)})
    assert checkpoint.load_checkpoint(path)["step"] == 3


# --- a resumed run equals an uninterrupted one, bitwise ---------------------------------------------------

class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("coupling, labels", [("independent", False), ("ot", False), ("independent", True),
                                              ("ot", True)])
def test_run_interrupted_by_an_exception_resumes_exactly(coupling, labels, tmp_path, monkeypatch):
    settings = dict(SETTINGS, coupling=coupling)
    reference = training.train(_model(labels=labels), _data(labels), **settings)

    path = tmp_path / "run.pt"
    real_loss, calls = paths.AffinePath.loss, []

    def crash_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # steps 1-6 done, last checkpoint at step 4
            raise _Interrupt("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(paths.AffinePath, "loss", crash_at_step_7)
    with pytest.raises(_Interrupt):
        training.train(_model(labels=labels), _data(labels), checkpoint=path, checkpoint_every=4, **settings)
    monkeypatch.setattr(paths.AffinePath, "loss", real_loss)
    assert torch.load(path, weights_only=True)["step"] == 4

    # resume into a differently initialised model: everything must come from the checkpoint
    resumed = training.train(_model(init=123, labels=labels), _data(labels), checkpoint=path, checkpoint_every=4,
                             **settings)
    assert resumed.steps == 8
    _assert_same_run(resumed, reference)


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_shorter_run_then_longer_run_equals_one_run(coupling, tmp_path):
    settings = dict(SETTINGS, coupling=coupling)
    reference = training.train(_model(), _data(), **settings)
    path = tmp_path / "run.pt"
    training.train(_model(), _data(), checkpoint=path, **dict(settings, steps=5))
    resumed = training.train(_model(init=7), _data(), checkpoint=path, **settings)
    _assert_same_run(resumed, reference)


def test_checkpoint_loads_with_weights_only_and_holds_the_configuration(tmp_path):
    path = tmp_path / "run.pt"
    model = _model(labels=True)
    training.train(model, _data(True), checkpoint=path, **dict(SETTINGS, steps=3))
    state = torch.load(path, weights_only=True)
    assert {"step", "model", "ema", "optimizer", "generator", "history", "config"} <= set(state)
    assert state["config"] == model.config and state["step"] == 3
    rebuilt = checkpoint.load_model(path, ema=False)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_resume_with_another_configuration_names_the_differing_key(tmp_path):
    path = tmp_path / "run.pt"
    training.train(_model(hidden=16), _data(), checkpoint=path, **dict(SETTINGS, steps=2))
    with pytest.raises(ValueError) as info:
        training.train(_model(hidden=32), _data(), checkpoint=path, **dict(SETTINGS, steps=4))
    msg = str(info.value)
    assert "hidden" in msg and "16" in msg and "32" in msg
    assert "depth" not in msg  # only the keys that differ


def test_resume_of_a_model_without_config_reports_the_mismatch(tmp_path):
    class Field(torch.nn.Module):  # a user model without a config dictionary
        def __init__(self, hidden):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))

        def forward(self, x, t):
            return self.net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], 1))

    path = tmp_path / "run.pt"
    training.train(Field(8), _data(), checkpoint=path, **dict(SETTINGS, steps=2))
    with pytest.raises(ValueError, match="does not fit this model"):
        training.train(Field(9), _data(), checkpoint=path, **dict(SETTINGS, steps=4))


# --- reproducible ------------------------------------------------------------------------------------

@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_same_seed_same_weights_other_seed_other_weights(coupling):
    settings = dict(SETTINGS, coupling=coupling, steps=6)
    a = training.train(_model(), _data(), **settings)
    b = training.train(_model(), _data(), **settings)
    _assert_same_run(a, b)
    c = training.train(_model(), _data(), **dict(settings, seed=6))
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))
    assert a.history != c.history


def test_sampling_with_a_seeded_generator_is_reproducible():
    model = _model()
    x = [solvers.sample(model, 16, steps=4, generator=torch.Generator().manual_seed(3)).x for _ in range(2)]
    assert torch.equal(x[0], x[1])


# --- argument checks stay out of inner loops ---------------------------------------------------------

@pytest.fixture
def check_calls(monkeypatch):
    """Count every call of a helper in cfmlib._checks."""
    calls = []
    for name in ("tensor", "time", "same_shape", "same_device", "number", "positive_int", "choice", "function",
                 "generator", "module_device", "labels", "shape"):
        real = getattr(_checks, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_checks, name, counted)
    return calls


def _count(calls, fn):
    calls.clear()
    fn()
    return len(calls)


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_training_validates_once_not_every_step(check_calls, coupling):
    short = _count(check_calls, lambda: training.train(_model(), _data(), **dict(SETTINGS, coupling=coupling,
                                                                                  steps=2)))
    long = _count(check_calls, lambda: training.train(_model(), _data(), **dict(SETTINGS, coupling=coupling,
                                                                                 steps=10)))
    assert short == long > 0


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_solvers_validate_once_not_every_step(check_calls, method):
    model = _model()
    x = torch.randn(8, 2)
    for run in (lambda n: solvers.odeint(model, x, method=method, steps=n),
                lambda n: solvers.sample(model, 8, method=method, steps=n),
                lambda n: solvers.sdeint(model, x, "condot", steps=n, g=0.5)):
        if "sdeint" in run.__code__.co_names and not hasattr(solvers, "sdeint"):
            continue
        assert _count(check_calls, lambda: run(2)) == _count(check_calls, lambda: run(20)) > 0


def test_flow_training_validates_once_not_every_step(check_calls):
    data = _data()
    counts = []
    for steps in (2, 10):
        torch.manual_seed(0)
        flow = flows.AffineCouplingFlow(dim=2, n_layers=2, hidden=8, depth=1)
        counts.append(_count(check_calls, lambda: flows.train_flow(flow, data, steps=steps, batch_size=16,
                                                                   progress=False)))
    assert counts[0] == counts[1] > 0


def test_path_conversions_for_solvers_skip_checks_but_agree():
    path, x, v = paths.CondOTPath(), torch.randn(5, 2), torch.randn(5, 2)
    t = torch.full((5,), 0.3)
    assert torch.equal(path.velocity_to_score(v, x, t, check=False), path.velocity_to_score(v, x, t))


# --- no network during unit tests ----------------------------------------------------------------------

def test_network_guard_blocks_the_internet_and_keeps_loopback(no_network):
    from conftest import NetworkAccessBlocked

    # the internet: refused at once, before any packet is sent or any name is resolved
    with pytest.raises(NetworkAccessBlocked):
        socket.create_connection(("example.com", 80), timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkAccessBlocked):
        s.connect(("93.184.216.34", 80))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkAccessBlocked):
        s.connect_ex(("10.1.2.3", 443))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(NetworkAccessBlocked):
        s.sendto(b"x", ("8.8.8.8", 53))
    with pytest.raises(NetworkAccessBlocked):
        socket.getaddrinfo("pypi.org", 443)
    import urllib.request
    with pytest.raises(NetworkAccessBlocked):
        urllib.request.urlopen("http://example.com", timeout=1)
    assert len(no_network) == 6  # each attempt was recorded (the test would fail even if it were caught)
    no_network.clear()  # these were on purpose

    # loopback still works (Jupyter kernels, Gloo, local HTTP servers)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.connect_ex(("127.0.0.1", 9))  # allowed: a closed port refuses, the guard does not
    a, b = socket.socketpair()  # Unix sockets
    a.sendall(b"ok")
    assert b.recv(2) == b"ok"
    a.close()
    b.close()
    assert no_network == []


def test_network_guard_is_active_in_every_test():
    assert socket.socket.connect.__module__ == "conftest"
    assert socket.create_connection.__module__ == "conftest"
