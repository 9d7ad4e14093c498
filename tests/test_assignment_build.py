"""How the compiled assignment solver is built and loaded: pip builds it (an optional extension, so
an install without a working compiler still succeeds and uses POT); it is loaded only from a file
and folder that no other user can write (a planted library is refused and never runs); a library
built from older sources is refused."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cfmlib import assignment

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
CC = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on this machine")
posix = pytest.mark.skipif(os.name != "posix", reason="file ownership checks are POSIX")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(assignment, "_state", {})
    monkeypatch.setattr(assignment, "_warned", False)
    monkeypatch.delenv("CFMLIB_ASSIGNMENT", raising=False)


def _offline_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def _checkout(dest: Path) -> Path:
    """A copy of what `pip install git+...` sees, without build outputs."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "cfmlib", dest / "cfmlib", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    return dest


def _build_wheel(tmp_path: Path, **env) -> Path:
    src = _checkout(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], cwd=tmp_path, env=_offline_env(**env),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cfmlib-*.whl")
    return wheel


def _run_installed(wheel: Path, tmp_path: Path, code: str) -> str:
    """Unpack the wheel (what pip installs) and run code against it, with this environment's torch."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_offline_env(PYTHONPATH=str(site)),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


CHECK = """
import importlib.util, warnings, numpy as np
# cfmlib/assignment.py alone (it needs only NumPy, POT and SciPy): no torch import in this check
spec = importlib.util.spec_from_file_location("cfmlib_assignment", {path!r})
a = importlib.util.module_from_spec(spec)
spec.loader.exec_module(a)
print(a.backend())
rng = np.random.default_rng(0)
cost = rng.random((50, 50))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    col = a.solve(cost)
from scipy.optimize import linear_sum_assignment
r, c = linear_sum_assignment(cost)
assert abs(cost[np.arange(50), col].sum() - cost[r, c].sum()) < 1e-9
print("warnings:", [str(x.message) for x in w if issubclass(x.category, a.AssignmentFallbackWarning)])
"""


def _check(wheel, tmp_path):
    return _run_installed(wheel, tmp_path, CHECK.format(path=str(tmp_path / "site" / "cfmlib" / "assignment.py")))


@needs_cc
def test_pip_builds_the_solver_and_it_is_used(tmp_path):
    wheel = _build_wheel(tmp_path)
    assert f"cfmlib/_assign{SUFFIX}" in zipfile.ZipFile(wheel).namelist()
    out = _check(wheel, tmp_path)
    assert out.startswith("compiled ("), out
    assert "warnings: []" in out


def _failing_compiler(tmp_path):
    failing = tmp_path / "bin" / "cc-that-fails"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'this compiler always fails' >&2\nexit 1\n")
    failing.chmod(0o755)
    return failing


def _has_library(wheel):
    return any(n.endswith((".so", ".pyd")) for n in zipfile.ZipFile(wheel).namelist())


@posix
def test_install_with_a_failing_compiler_succeeds_and_uses_pot(tmp_path):
    wheel = _build_wheel(tmp_path, CC=str(_failing_compiler(tmp_path)))
    assert not _has_library(wheel)
    out = _check(wheel, tmp_path)
    assert out.startswith("pot (the compiled solver is not in use: it is not installed"), out
    assert "warnings: [\"cfmlib's compiled assignment solver is not in use: it is not installed" in out, out


@posix
def test_install_with_no_compiler_on_the_path_succeeds(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    wheel = _build_wheel(tmp_path, PATH=str(empty), CC="gcc")
    assert not _has_library(wheel)


# ----------------------------------------------------------------------------- loading safely
def _planted_library(folder: Path, marker: Path) -> Path:
    """A shared library that, if ever loaded, writes `marker` before any cfmlib code can check it."""
    src = folder.parent / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n'
                   f'    FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    lib = folder / f"_assign{SUFFIX}"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    return lib


@needs_cc
@posix
def test_a_library_planted_in_a_folder_others_can_write_is_refused(tmp_path):
    marker = tmp_path / "it-ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    lib = _planted_library(shared, marker)
    shared.chmod(0o777)  # any user could have put the library there
    solver, reason = assignment._load(shared)
    assert solver is None and "writable by other users" in reason, reason
    assert not marker.exists()
    # a file others can write, in a private folder
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    lib2 = private / lib.name
    shutil.copy(lib, lib2)
    lib2.chmod(0o666)
    solver, reason = assignment._load(private)
    assert solver is None and "writable by other users" in reason, reason
    assert not marker.exists()
    # control: the same library in a folder only its owner can write is loaded, and runs
    lib2.chmod(0o755)
    assignment._state.clear()
    solver, reason = assignment._load(private)
    assert marker.exists(), "the control library was not loaded: the refusals above prove nothing"
    assert solver is None and "could not be loaded" in reason  # not a solver, but it did run


@posix
def test_ownership_and_links_are_checked(tmp_path):
    folder = tmp_path / "lib"
    folder.mkdir(mode=0o755)
    f = folder / f"_assign{SUFFIX}"
    f.write_bytes(b"\0")
    f.chmod(0o644)
    assert assignment._unsafe_reason(f) is None
    if os.getuid() == 0:
        os.chown(f, 4242, -1)
        assert "belongs to another user (uid 4242)" in assignment._unsafe_reason(f)
        os.chown(f, 0, -1)
    else:  # the same check, seen by another user
        assert "belongs to another user" in assignment._unsafe_reason(f, uid=os.getuid() + 1)
    # a link from a safe folder to a file in an unsafe one is judged by the file it points to
    unsafe = tmp_path / "open"
    unsafe.mkdir()
    target = unsafe / "real.so"
    target.write_bytes(b"\0")
    target.chmod(0o644)
    unsafe.chmod(0o777)
    link = tmp_path / "safe"
    link.mkdir(mode=0o700)
    (link / "lib.so").symlink_to(target)
    assert "writable by other users" in assignment._unsafe_reason(link / "lib.so")
    # a sticky, world-writable folder above (like /tmp) is fine; holding the file itself is not
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    inner = sticky / "mine"
    inner.mkdir(mode=0o700)
    g = inner / "x.so"
    g.write_bytes(b"\0")
    assert assignment._unsafe_reason(g) is None
    h = sticky / "x.so"
    h.write_bytes(b"\0")
    assert "writable by other users" in assignment._unsafe_reason(h)


def test_the_solver_is_looked_for_in_cfmlibs_own_folder_only(tmp_path, monkeypatch):
    """No cache or temporary folder: a library elsewhere is never considered."""
    solver, _ = assignment._load()
    if solver is not None:
        assert Path(solver.path).parent == Path(assignment.__file__).resolve().parent
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / f"_assign{SUFFIX}").write_bytes(b"\0")
    (tmp_path / "cfmlib").mkdir()
    (tmp_path / "cfmlib" / f"_assign{SUFFIX}").write_bytes(b"\0")
    assert assignment._library_path(tmp_path / "elsewhere") is None
    assignment._state.clear()
    again, _ = assignment._load()
    assert (again is None) == (solver is None) and (again is None or again.path == solver.path)


@needs_cc
@posix
def test_a_library_built_from_older_sources_is_refused(tmp_path):
    solver, reason = assignment._load()
    if solver is None:
        pytest.skip(f"no compiled solver here: {reason}")
    folder = tmp_path / "pkg"
    folder.mkdir(mode=0o700)
    for name in ("_assign.c", "_assign_kernels.h"):
        shutil.copy(assignment._HERE / name, folder / name)
    shutil.copy(solver.path, folder / solver.path.name)
    ok, reason = assignment._load(folder)
    assert ok is not None, reason  # control: same sources, loaded
    with open(folder / "_assign.c", "a") as fh:
        fh.write("/* edited after the build */\n")
    assignment._state.clear()
    stale, reason = assignment._load(folder)
    assert stale is None and "older version of cfmlib/_assign.c" in reason, reason


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_wide_instructions_only_in_the_kernels_chosen_at_run_time():
    """The library must run on any x86-64 processor (a wheel or a shared home directory may reach
    another machine): AVX-512 registers appear only in the *_avx512 kernels, AVX registers only in
    those and the *_avx2 kernels; everything else is baseline code."""
    import platform
    import re

    solver, reason = assignment._load()
    if solver is None:
        pytest.skip(f"no compiled solver here: {reason}")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the kernel sets are x86-64 specific")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(solver.path)], check=True, capture_output=True,
                          text=True).stdout
    seen = set()
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        m = re.match(r"[0-9a-f]+ <([^>]+)>:", block)
        if not m:
            continue
        name = m.group(1)
        seen.add(name)
        if not name.endswith("_avx512"):
            assert not re.search(r"%zmm|%k[0-7]", block), f"{name} uses AVX-512"
        if not name.endswith(("_avx512", "_avx2")):
            assert "%ymm" not in block, f"{name} uses AVX"
    assert {"two_min_f_avx512", "two_min_f_avx2", "two_min_f_base", "cfm_assign"} <= seen


@posix
def test_group_write_is_accepted_only_for_a_user_private_group(tmp_path):
    """umask 002 makes files group-writable; harmless when the group is the user's own private
    group (named after the user, no other members), refused for any shared group."""
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid())
    folder = tmp_path / "lib"
    folder.mkdir(mode=0o700)
    f = folder / "x.so"
    f.write_bytes(b"\0")
    f.chmod(0o664)
    own = grp.getgrgid(me.pw_gid)
    if own.gr_name == me.pw_name and set(own.gr_mem) <= {me.pw_name}:
        assert assignment._unsafe_reason(f) is None
    else:
        assert "writable by other users" in assignment._unsafe_reason(f)
    shared = [g for g in grp.getgrall() if g.gr_gid != me.pw_gid and g.gr_name != me.pw_name]
    if os.getuid() != 0 or not shared:
        pytest.skip("changing a file's group to a shared group needs root")
    os.chown(f, -1, shared[0].gr_gid)
    assert "writable by other users" in assignment._unsafe_reason(f)
    f.chmod(0o644)
    assert assignment._unsafe_reason(f) is None  # not group-writable: the group does not matter
