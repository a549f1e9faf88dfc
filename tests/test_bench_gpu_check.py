"""The GPU runbook's plumbing (stages, report, $OUT), without a GPU."""
import sys
import tarfile

from bench import gpu_check


def test_stages_are_logged_reported_and_published(tmp_path, monkeypatch):
    folder = tmp_path / "nvidia-test-2026-01-01"
    folder.mkdir()
    ok = gpu_check._run_stage("hello", [sys.executable, "-c", "print('hi')"],
                              folder / "hello.log", timeout_s=None)
    failed = gpu_check._run_stage("boom", [sys.executable, "-c", "raise SystemExit(3)"],
                                  folder / "boom.log", timeout_s=None)
    slow = gpu_check._run_stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"],
                                folder / "slow.log", timeout_s=0.5)
    assert (ok["returncode"], ok["last_line"]) == (0, "hi")
    assert failed["returncode"] == 3
    assert slow["returncode"] == "stopped after 0.5 s" and slow["seconds"] < 20
    report = gpu_check._write_report(folder, [ok, failed, slow]).read_text()
    assert "| hello (`hello.log`) | passed |" in report
    assert "| boom (`boom.log`) | **FAILED** (3) |" in report

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    gpu_check._publish(folder)
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.md",
                                                     "nvidia-test-2026-01-01.tar.gz"]
    with tarfile.open(out / "nvidia-test-2026-01-01.tar.gz") as tar:
        assert "nvidia-test-2026-01-01/hello.log" in tar.getnames()
