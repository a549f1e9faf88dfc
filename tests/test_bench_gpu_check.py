"""The GPU runbook without a GPU: the plan and its budget, the dry run, stages that are
logged, stopped at their slice or skipped, the record and $OUT."""
import datetime
import json
import os
import subprocess
import sys
import tarfile

import pytest

from bench.gpu import check as gpu_check
from bench.gpu.check import Stage

PY = sys.executable


def _stage(name, code="print('hi')", estimate=1.0, needs=None):
    return Stage(name, [PY, "-c", code], estimate, f"what {name} answers", needs)


def test_plan_is_in_order_of_value(tmp_path):
    names = [stage.name for stage in gpu_check.stages(PY, tmp_path)]
    # Training right after the install, then attention at every version, then LayerNorm
    # and cross-entropy and the variants, then the conformance suite and the rest.
    expected = ["install", "train", "attention", "memory", "variants", "conformance",
                "gpu-tests", "train-backends", "kernels", "kernels-vs-static", "e2e", "tests",
                "sweep"]
    assert names == expected
    gpu_tests = next(s for s in gpu_check.stages(PY, tmp_path) if s.name == "gpu-tests")
    assert "-m" in gpu_tests.command and "gpu" in gpu_tests.command


def test_conformance_stage_only_when_the_suite_exists(tmp_path):
    assert "conformance" not in [s.name for s in gpu_check.stages(PY, tmp_path, repo=tmp_path)]
    (tmp_path / "tests").mkdir()
    (tmp_path / gpu_check.CONFORMANCE_TESTS).write_text("")
    assert [s.name for s in gpu_check.stages(PY, tmp_path, repo=tmp_path)][5] == "conformance"


def test_time_slices_and_skips():
    stage = _stage("s", estimate=100)
    assert gpu_check.time_slice(stage, 500) == 200       # twice the estimate
    assert gpu_check.time_slice(stage, 150) == 150       # at most what is left
    assert gpu_check.time_slice(stage, 99) is None       # the estimate does not fit


def test_select_and_measured_estimates(tmp_path):
    plan = [_stage("a"), _stage("b"), _stage("c")]
    assert [s.name for s in gpu_check.select(plan, ["a", "c"], [])] == ["a", "c"]
    assert [s.name for s in gpu_check.select(plan, None, ["b"])] == ["a", "c"]
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_check.select(plan, None, ["nope"])
    first = tmp_path / "h100-2026-01-01-0900" / gpu_check.RECORD
    first.parent.mkdir()
    first.write_text(json.dumps({"outcomes": [
        {"stage": "a", "status": "passed", "seconds": 50.0},
        {"stage": "c", "status": "passed", "seconds": 7.0}]}))
    # A rental's second call, newer: what it ran replaces the first's figures, the rest stay.
    second = tmp_path / "h100-2026-01-01-0909" / gpu_check.RECORD
    second.parent.mkdir()
    second.write_text(json.dumps({"outcomes": [
        {"stage": "a", "status": "passed", "seconds": 42.0},
        {"stage": "b", "status": "stopped", "seconds": 999.0},
        {"stage": "c", "status": "skipped", "seconds": 0.0}]}))
    os.utime(first, (1_000, 1_000))
    os.utime(second, (2_000, 2_000))
    measured = gpu_check.measured_durations(tmp_path)
    assert measured == {"a": 42.0, "c": 7.0}
    assert [s.estimate_s for s in gpu_check.with_estimates(plan, measured)] == [42.0, 1.0, 7.0]
    # A record never lowers a planning figure (the stage may have grown since).
    assert gpu_check.with_estimates([_stage("a", estimate=90)], measured)[0].estimate_s == 90


def test_plan_rendering_fits_the_budget():
    plan = [_stage("build", estimate=150), _stage("tests", estimate=300),
            _stage("bench", estimate=100)]
    text = gpu_check.render_plan(plan, budget_s=300)
    lines = [line for line in text.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    assert "run, ends at ~150 s" in lines[0]
    assert "skip: needs ~300 s, 150 s left" in lines[1]
    assert "run, ends at ~250 s" in lines[2]  # a later, shorter stage still fits


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    done = subprocess.run([PY, str(gpu_check.REPO_ROOT / "bench" / "gpu" / "check.py"),
                           "--dry-run", "--budget", "600"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "budget 600 s" in done.stdout and "bench headline attention" in done.stdout
    assert not list(tmp_path.iterdir())
    assert "<gpu>" in done.stdout  # no device was looked up


def test_training_starts_within_the_first_150_seconds_of_the_default_plan(tmp_path):
    """The dry run of `make gpu-check` as a 15-minute rental gets it: the stage before
    training (the install) ends by 150 s, with the repository's own estimates."""
    done = subprocess.run([PY, str(gpu_check.REPO_ROOT / "bench" / "gpu" / "check.py"),
                           "--dry-run"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    numbered = [line for line in done.stdout.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    names = [line.split()[1] for line in numbered]
    assert names[:4] == ["install", "train", "attention", "memory"]
    install_ends = float(numbered[0].split("ends at ~")[1].split(" s")[0])
    assert install_ends <= 150
    # Training and the two headlines fit the default budget: one device command.
    assert all("run, ends at" in line for line in numbered[1:4])


def test_the_train_stage_runs_nanogpt_when_given_a_checkout(tmp_path):
    plain = next(s for s in gpu_check.stages(PY, tmp_path) if s.name == "train")
    assert "--nanogpt" not in plain.command and "ours only" in plain.what
    beside = next(s for s in gpu_check.stages(PY, tmp_path, nanogpt=tmp_path / "nanoGPT")
                  if s.name == "train")
    assert beside.command[beside.command.index("--nanogpt") + 1] == str(tmp_path / "nanoGPT")
    rest = next(s for s in gpu_check.stages(PY, tmp_path) if s.name == "train-backends")
    assert "--append" in rest.command


def test_stages_are_logged_stopped_skipped_recorded_and_published(tmp_path, monkeypatch):
    folder = tmp_path / "nvidia-test-2026-01-01"
    folder.mkdir()
    plan = [_stage("hello", estimate=5),
            _stage("boom", "raise SystemExit(3)", estimate=5),
            _stage("slow", "import time; time.sleep(30)", estimate=0.25),
            _stage("huge", estimate=10_000),
            _stage("after", estimate=5, needs=str(folder / "missing.json"))]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    outcomes = {o.stage: o for o in gpu_check.run(plan, folder, budget_s=60)}
    assert (outcomes["hello"].status, outcomes["hello"].detail) == ("passed", "hi")
    assert (outcomes["boom"].status, outcomes["boom"].returncode) == ("failed", 3)
    assert outcomes["slow"].status == "stopped" and outcomes["slow"].seconds < 20
    assert outcomes["huge"].status == "skipped" and "left in the budget" in outcomes["huge"].detail
    assert outcomes["after"].status == "skipped" and "missing.json" in outcomes["after"].detail

    record = json.loads((folder / gpu_check.RECORD).read_text())
    assert [o["stage"] for o in record["outcomes"]] == [s.name for s in plan]
    report = (folder / "gpu-check.md").read_text()
    assert "| hello (`hello.log`) | passed |" in report
    assert "| boom (`boom.log`) | **FAILED** (3) |" in report
    assert "| huge | skipped |" in report
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.md",
                                                     "nvidia-test-2026-01-01.tar.gz"]
    with tarfile.open(out / "nvidia-test-2026-01-01.tar.gz") as tar:
        assert "nvidia-test-2026-01-01/hello.log" in tar.getnames()


def test_no_tests_collected_is_not_a_failure(tmp_path):
    outcome = gpu_check.run_stage(_stage("empty", "raise SystemExit(5)"), tmp_path / "e.log", None)
    assert outcome.status == "passed"


def test_the_install_stamp_names_the_sources_and_the_python(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "kernel.cu").write_text("v1")
    (tmp_path / "setup.py").write_text("setup()")
    stamp = gpu_check.install_stamp(tmp_path, "/usr/bin/python3")
    assert stamp.parent == tmp_path / "build"  # ignored by git, kept on a warm machine
    assert gpu_check.install_stamp(tmp_path, "/usr/bin/python3") == stamp
    assert gpu_check.install_stamp(tmp_path, "/opt/python3") != stamp
    (tmp_path / "csrc" / "kernel.cu").write_text("v2")
    assert gpu_check.install_stamp(tmp_path, "/usr/bin/python3") != stamp
    install = next(s for s in gpu_check.stages(PY, tmp_path, repo=tmp_path)
                   if s.name == "install")
    assert install.stamp == str(gpu_check.install_stamp(tmp_path, PY))


def test_a_stamped_stage_runs_once_on_a_machine(tmp_path):
    """The install of a rental's first call is not repeated by its second on the same
    machine; a failed one leaves no stamp, so the next call tries again."""
    stamp = tmp_path / "build" / "stamp"
    failing = Stage("install", [PY, "-c", "raise SystemExit(1)"], 1.0, "builds",
                    stamp=str(stamp))
    first = gpu_check.run([failing], tmp_path, budget_s=60)
    assert first[0].status == "failed" and not stamp.exists()
    passing = Stage("install", [PY, "-c", "print('built')"], 1.0, "builds", stamp=str(stamp))
    assert gpu_check.run([passing], tmp_path, budget_s=60)[0].status == "passed"
    assert stamp.exists()
    again = gpu_check.run([passing], tmp_path, budget_s=0.5)  # skipped before the budget
    assert again[0].status == "skipped" and "done on this machine already" in again[0].detail
    plan = gpu_check.render_plan([passing, _stage("next", estimate=10)], budget_s=20)
    assert "skip: done on this machine already" in plan
    assert "run, ends at ~10 s" in plan  # the skipped stage costs the budget nothing


def test_nanogpt_travels_with_the_repository(tmp_path):
    assert gpu_check.default_nanogpt(tmp_path) is None
    (tmp_path / gpu_check.NANOGPT_CHECKOUT).mkdir()
    assert gpu_check.default_nanogpt(tmp_path) is None  # a folder without train.py
    (tmp_path / gpu_check.NANOGPT_CHECKOUT / "train.py").write_text("")
    assert gpu_check.default_nanogpt(tmp_path) == tmp_path / gpu_check.NANOGPT_CHECKOUT
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{gpu_check.NANOGPT_CHECKOUT}/x"],
                             cwd=gpu_check.REPO_ROOT)
    assert ignored.returncode == 0  # never committed


def test_each_call_gets_its_own_record_folder(tmp_path):
    nine = datetime.datetime(2026, 1, 2, 9, 0, tzinfo=datetime.timezone.utc)
    folder = gpu_check.record_folder("nvidia-h100", nine, tmp_path)
    assert folder == tmp_path / "nvidia-h100-2026-01-02-0900"
    later = gpu_check.record_folder("nvidia-h100", nine + datetime.timedelta(minutes=9),
                                    tmp_path)
    assert later != folder


def test_publish_returns_at_most_eight_files(tmp_path, monkeypatch):
    folder = tmp_path / "nvidia-test-2026-01-01-0900"
    folder.mkdir()
    for name in ["gpu-check", *(f"summary-{i}" for i in range(10))]:
        (folder / f"{name}.md").write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    gpu_check.publish(folder)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 1 + gpu_check.PUBLISHED_SUMMARIES <= 8
    assert "gpu-check.md" in names and f"{folder.name}.tar.gz" in names
    with tarfile.open(out / f"{folder.name}.tar.gz") as tar:
        assert f"{folder.name}/summary-9.md" in tar.getnames()  # the rest are in the tarball
