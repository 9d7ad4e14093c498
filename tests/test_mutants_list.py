"""tools/mutants.py breaks cfmlib on purpose; its list must keep matching the code it breaks."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("cfmlib_mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cfmlib_mutants", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_exactly_one_place_and_changes_it():
    m = _mutants()
    names = [mutant.name for mutant in m.MUTANTS]
    assert len(names) == len(set(names)), "two mutants share a name"
    for mutant in m.MUTANTS:
        text = (ROOT / "cfmlib" / mutant.file).read_text()
        assert text.count(mutant.old) == 1, f"{mutant.name}: its code is not in cfmlib/{mutant.file} exactly once"
        assert mutant.new != mutant.old, f"{mutant.name} changes nothing"


def test_apply_refuses_stale_code(tmp_path):
    m = _mutants()
    mutant = m.MUTANTS[0]
    (tmp_path / mutant.file).write_text("code that no longer contains the mutant's target\n")
    assert m.apply(mutant, tmp_path) is False
    (tmp_path / mutant.file).write_text(f"before\n{mutant.old}\nafter\n")
    assert m.apply(mutant, tmp_path) is True
    assert (tmp_path / mutant.file).read_text() == f"before\n{mutant.new}\nafter\n"
