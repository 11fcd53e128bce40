"""The GitHub Actions workflows and the example batch file.

actionlint checks every workflow (and, when shellcheck is installed, the shell of
every ``run:`` step); the YAML tests pin down what the bot relies on: the inputs of
the merge workflow, that no input or secret is pasted into a shell script, where
HF_TOKEN comes from, and the schema of ``.github/batch/merges.yaml``.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / ".github" / "workflows"
BATCH_FILE = ROOT / ".github" / "batch" / "merges.yaml"
BATCH_FILE_REL = ".github/batch/merges.yaml"
WORKFLOW_FILES = sorted([*WORKFLOW_DIR.glob("*.yml"), *WORKFLOW_DIR.glob("*.yaml")])

DTYPES = ["auto", "bfloat16", "float16", "float32"]
HF_TOKEN_FROM_SECRET = "${{ secrets.HF_TOKEN }}"
# ${{ ... }} expressions, possibly spanning lines.
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
# Contexts that must never be expanded inside a script: workflow inputs and event
# payloads (script injection) and secrets (they belong in env:, where they stay masked).
UNSAFE_IN_SCRIPT = re.compile(r"\b(inputs|github\s*\.\s*event|secrets)\b")


# --- finding the tools ------------------------------------------------------------

def _tool_dirs() -> list[str]:
    """Where pip puts console scripts for this interpreter, then next to it."""
    dirs = []
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if d and d not in dirs and os.path.isdir(d):
            dirs.append(d)
    return dirs


def _find_tool(name: str) -> str | None:
    """The tool installed with this interpreter's packages, else one on PATH."""
    suffixes = [".exe", ""] if os.name == "nt" else [""]
    for d in _tool_dirs():
        for suffix in suffixes:
            candidate = os.path.join(d, name + suffix)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return shutil.which(name)


# --- reading the workflows ----------------------------------------------------------

def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def _triggers(workflow: dict) -> dict:
    """The `on:` mapping. YAML 1.1 reads the bare key `on` as the boolean True."""
    on = workflow["on"] if "on" in workflow else workflow.get(True)
    assert on is not None, "workflow has no `on:` triggers"
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {name: None for name in on}
    return on


def _steps(workflow: dict):
    """(job id, job, step) for every step of every job."""
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, job, step


def _run_steps(workflow: dict):
    for job_id, job, step in _steps(workflow):
        if "run" in step:
            yield job_id, job, step


def _env(workflow: dict, job: dict, step: dict) -> dict:
    """The environment a step sees from the workflow file: workflow, job, step env."""
    return {**(workflow.get("env") or {}), **(job.get("env") or {}), **(step.get("env") or {})}


def _norm(expr) -> str:
    """`${{secrets.X}}` and `${{  secrets.X }}` compare equal."""
    return re.sub(r"\s+", "", str(expr))


def _the_step_running(workflow: dict, command: str):
    found = [(job, step) for _, job, step in _run_steps(workflow) if command in step["run"]]
    assert len(found) == 1, f"expected exactly one step running {command!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def ci() -> dict:
    return _load(WORKFLOW_DIR / "ci.yml")


@pytest.fixture(scope="module")
def merge() -> dict:
    return _load(WORKFLOW_DIR / "merge.yml")


@pytest.fixture(scope="module")
def batch() -> dict:
    return _load(WORKFLOW_DIR / "batch.yml")


# --- actionlint --------------------------------------------------------------------

def test_the_workflows_are_there():
    names = {p.name for p in WORKFLOW_FILES}
    assert {"ci.yml", "merge.yml", "batch.yml"} <= names, names


def test_actionlint_passes_on_every_workflow():
    actionlint = _find_tool("actionlint")
    if actionlint is None:
        pytest.fail(
            "actionlint not found next to this Python nor on PATH; "
            "install the test requirements: python -m pip install -r requirements.txt"
        )
    shellcheck = _find_tool("shellcheck")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([*_tool_dirs(), env.get("PATH", "")])
    # An explicit path makes the shellcheck pass deterministic; without one, turn
    # it off rather than depend on whatever happens to be on PATH.
    shellcheck_flag = f"-shellcheck={shellcheck}" if shellcheck else "-shellcheck="
    cmd = [actionlint, "-no-color", shellcheck_flag, *(str(p.relative_to(ROOT)) for p in WORKFLOW_FILES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"actionlint exited {proc.returncode} "
        f"(shellcheck: {shellcheck or 'not installed, skipped'})\n"
        f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    )


# --- every workflow ------------------------------------------------------------------

@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_is_read_only_and_bounded(path):
    workflow = _load(path)
    assert _triggers(workflow)
    assert workflow.get("permissions") == {"contents": "read"}, "the token needs nothing but reading the code"
    for job_id, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"job {job_id} has no timeout-minutes"
        assert 0 < job["timeout-minutes"] <= 360, f"job {job_id}: GitHub stops jobs at 360 minutes anyway"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_no_input_event_or_secret_is_expanded_inside_a_script(path):
    workflow = _load(path)
    for job_id, _, step in _run_steps(workflow):
        for expression in EXPRESSION.findall(step["run"]):
            assert not UNSAFE_IN_SCRIPT.search(expression), (
                f"{path.name}, job {job_id}, step {step.get('name', step['run'][:40])!r}: "
                f"`${{{{{expression}}}}}` is pasted into the script; pass it through env: instead"
            )


def test_the_unsafe_expression_check_catches_the_usual_spellings():
    for script in (
        'echo "${{ inputs.adapter }}"',
        "python -m bot run ${{inputs.adapter}}",
        "x=${{ github.event.inputs.repo }}",
        "x=${{ github . event.inputs.repo }}",
        "x=${{ format('{0}', inputs.base) }}",
        "export T=${{ secrets.HF_TOKEN }}",
        "echo ${{\n  inputs.dtype\n}}",
    ):
        assert any(UNSAFE_IN_SCRIPT.search(e) for e in EXPRESSION.findall(script)), script
    assert not any(UNSAFE_IN_SCRIPT.search(e) for e in EXPRESSION.findall("echo ${{ runner.temp }}"))


# --- ci.yml --------------------------------------------------------------------------

def test_ci_runs_the_readme_commands_on_push_and_pull_request(ci):
    assert {"push", "pull_request"} <= set(_triggers(ci))
    scripts = [step["run"] for _, _, step in _run_steps(ci)]
    joined = "\n".join(scripts)
    if ".ci/run" not in joined:
        install = [i for i, s in enumerate(scripts) if "pip install -r requirements.txt" in s]
        test = [i for i, s in enumerate(scripts) if "python -m pytest" in s]
        assert install and test, scripts
        assert install[0] <= test[0], "tests run before the requirements are installed"


def test_ci_uses_python_311_with_a_pip_cache(ci):
    setups = [step for _, _, step in _steps(ci) if str(step.get("uses", "")).startswith("actions/setup-python@")]
    assert len(setups) == 1
    config = setups[0]["with"]
    # A string: an unquoted 3.10 would be read as the float 3.1.
    assert config["python-version"] == "3.11"
    assert config["cache"] == "pip"


# --- merge.yml -----------------------------------------------------------------------

def test_merge_is_started_by_hand_with_the_documented_inputs(merge):
    triggers = _triggers(merge)
    assert set(triggers) == {"workflow_dispatch"}
    inputs = triggers["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"adapter", "repo", "pr", "private", "base", "dtype"}
    for name in ("adapter", "repo"):
        assert inputs[name]["required"] is True, name
        assert inputs[name]["type"] == "string", name
    for name in ("pr", "private"):
        assert inputs[name]["type"] == "boolean", name
        assert inputs[name].get("default") is False, name
        assert not inputs[name].get("required", False), name
    assert inputs["base"]["type"] == "string"
    assert not inputs["base"].get("required", False)
    assert inputs["dtype"]["type"] == "choice"
    assert inputs["dtype"]["options"] == DTYPES
    assert inputs["dtype"]["default"] == "auto"
    for name, spec in inputs.items():
        assert spec.get("description"), f"input {name} has no description"


def test_merge_passes_every_input_and_the_token_through_env(merge):
    job, step = _the_step_running(merge, "python -m bot run")
    env = _env(merge, job, step)
    assert _norm(env.get("HF_TOKEN")) == _norm(HF_TOKEN_FROM_SECRET)
    inputs = set(_triggers(merge)["workflow_dispatch"]["inputs"])
    passed = {
        m.group(1)
        for value in env.values()
        for m in re.finditer(r"\binputs\.([A-Za-z_][\w-]*)", str(value))
    }
    assert passed == inputs, f"inputs not passed through env: {sorted(inputs - passed)}"


def test_merge_command_quotes_its_arguments_and_adds_flags_only_when_set(merge):
    _, step = _the_step_running(merge, "python -m bot run")
    script = step["run"]
    assert 'python -m bot run "$ADAPTER" --repo "$REPO" --dtype "$DTYPE" "${flags[@]}"' in script
    assert "flags=()" in script
    assert "flags+=(--pr)" in script
    assert "flags+=(--private)" in script
    assert 'flags+=(--base "$BASE")' in script
    # The token is read by the bot from the environment, never put on a command line.
    assert "--token" not in script


def test_merge_runs_one_at_a_time_per_target_repo(merge):
    concurrency = merge["concurrency"]
    assert "inputs.repo" in _norm(concurrency["group"])
    assert concurrency.get("cancel-in-progress") is False, "a queued merge must not kill a running one"


# --- batch.yml -----------------------------------------------------------------------

def test_batch_runs_by_hand_and_when_the_batch_file_changes_on_main(batch):
    triggers = _triggers(batch)
    assert set(triggers) == {"workflow_dispatch", "push"}
    file_input = triggers["workflow_dispatch"]["inputs"]["file"]
    assert file_input["default"] == BATCH_FILE_REL
    assert triggers["push"]["branches"] == ["main"]
    assert triggers["push"]["paths"] == [BATCH_FILE_REL]


def test_batch_runs_the_bot_on_the_file_with_the_token_from_secrets(batch):
    job, step = _the_step_running(batch, "python -m bot batch")
    assert 'python -m bot batch "$FILE"' in step["run"]
    env = _env(batch, job, step)
    assert _norm(env.get("HF_TOKEN")) == _norm(HF_TOKEN_FROM_SECRET)
    # A push has no inputs, so the file name needs a fallback to the default.
    assert _norm(env["FILE"]) == _norm(f"${{{{ inputs.file || '{BATCH_FILE_REL}' }}}}")


# --- .github/batch/merges.yaml ------------------------------------------------------

JOB_TYPES = {"adapter": str, "repo": str, "pr": bool, "private": bool, "base": str, "dtype": str}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _check_batch(data, where: str) -> list:
    assert isinstance(data, dict) and set(data) == {"jobs"}, f"{where}: expected only a top-level `jobs:`"
    jobs = data["jobs"]
    assert isinstance(jobs, list), f"{where}: `jobs` must be a list"
    for i, job in enumerate(jobs):
        assert isinstance(job, dict), f"{where}: job {i} is not a mapping"
        unknown = set(job) - set(JOB_TYPES)
        assert not unknown, f"{where}: job {i} has unknown keys {sorted(unknown)}"
        for key in ("adapter", "repo"):
            assert job.get(key), f"{where}: job {i} has no {key}"
        for key, value in job.items():
            assert isinstance(value, JOB_TYPES[key]), f"{where}: job {i}: {key} must be a {JOB_TYPES[key].__name__}"
        assert REPO_ID.match(job["repo"]), f"{where}: job {i}: repo must be OWNER/NAME"
        assert job.get("dtype", "auto") in DTYPES, f"{where}: job {i}: dtype must be one of {DTYPES}"
        assert not (job.get("pr") and job.get("private")), f"{where}: job {i}: private applies to new repos, not to pr"
    return jobs


def test_the_batch_file_is_a_valid_jobs_list():
    _check_batch(yaml.safe_load(BATCH_FILE.read_text(encoding="utf-8")), BATCH_FILE_REL)


def test_the_commented_example_in_the_batch_file_is_valid_too():
    """The example is what people will uncomment, so it has to follow the schema."""
    lines = BATCH_FILE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# jobs:")
    example = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        example.append(line[2:] if line.startswith("# ") else line[1:])
    jobs = _check_batch(yaml.safe_load("\n".join(example)), f"{BATCH_FILE_REL} (example)")
    assert len(jobs) >= 2
    assert {key for job in jobs for key in job} == set(JOB_TYPES), "the example should show every key"
