"""The installed project, as a user meets it: no other package owns the import name
`kernels` in its environment, a clash is refused at import with both names and the remedy,
and every console script works from a directory outside the checkout (where the checkout
is not on sys.path, so only the installation provides the packages)."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = Path(sys.executable).parent


def _python(code: str, cwd: Path, pythonpath: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_no_other_package_named_kernels_is_installed():
    """transformers 5 pulls in Hugging Face's `kernels`, which shares our import name:
    pyproject.toml keeps transformers below 5 so that the project's environment never
    holds it."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")
    assert importlib.metadata.version("transformers").split(".")[0] == "4"


def _fake_hugging_face_kernels(root: Path, with_package: bool) -> Path:
    """A directory holding the distribution metadata of Hugging Face's `kernels` 0.17.2
    (and, with_package, its top-level package, as installed into site-packages)."""
    info = root / "kernels-0.17.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    if with_package:
        (root / "kernels").mkdir()
        (root / "kernels" / "__init__.py").write_text("class CUDAProperties: pass\n")
    return root


def test_their_kernels_first_on_the_path_is_refused_by_gpt(tmp_path):
    """Where Hugging Face's package is imported as `kernels` (it comes first on sys.path),
    `import gpt` fails at once, naming both packages and the remedy."""
    fake = _fake_hugging_face_kernels(tmp_path / "site", with_package=True)
    for module in ("gpt", "gpt.train", "bench"):
        result = _python(f"import {module}", cwd=tmp_path, pythonpath=fake)
        assert result.returncode != 0, module
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError:"), result.stderr
        assert "gpt-kernels" in last and "Hugging Face" in last and \
            "pip uninstall kernels" in last, last


def test_ours_beside_their_installed_kernels_is_refused_at_import(tmp_path):
    """Where ours comes first but theirs is installed too, transformers would import ours
    and fail far from the cause: importing ours fails at once instead."""
    fake = _fake_hugging_face_kernels(tmp_path / "site", with_package=False)
    result = _python("import kernels", cwd=ROOT, pythonpath=fake)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:"), result.stderr
    assert "kernels 0.17.2" in last and "gpt-kernels" in last and "pip uninstall kernels" in last


def _script(name: str) -> str:
    path = SCRIPTS_DIR / name
    if not path.exists():
        importlib.metadata.version("gpt-kernels")  # installed, so its scripts must be there
        pytest.fail(f"console script {name} is missing from {SCRIPTS_DIR}")
    return str(path)


@pytest.mark.usefixtures("one_thread")
def test_console_scripts_work_outside_the_checkout(tmp_path):
    """Prepare, train, sample and inspect with the installed commands, run from a directory
    that is not the checkout."""
    try:
        importlib.metadata.version("gpt-kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the project is not installed in this environment (make install)")
    text = tmp_path / "text.txt"
    text.write_text(textwrap.dedent("""\
        First Citizen: Before we proceed any further, hear me speak.
        All: Speak, speak. You are all resolved rather to die than to famish?
        """) * 40)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    def run(*argv):
        result = subprocess.run(list(argv), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{argv[0]}: {result.stderr[-2000:]}"
        return result.stdout

    for name in ("gpt-train", "gpt-sample", "gpt-prepare", "gpt-inspect"):
        assert "usage" in run(_script(name), "--help").lower(), name
    run(_script("gpt-prepare"), str(text), "data/text")
    out = run(_script("gpt-train"), "--data_dir=data/text", "--out_dir=out", "--device=cpu",
              "--compile=False", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=16",
              "--block_size=16", "--batch_size=4", "--max_iters=2", "--eval_interval=2",
              "--eval_iters=1", "--warmup_iters=1", "--lr_decay_iters=2", "--progress=False")
    assert "iter 2" in out or "step 2" in out, out[-1000:]
    assert "Citizen" in run(_script("gpt-sample"), "--out_dir=out", "--device=cpu",
                            "--start=Citizen", "--num_samples=1", "--max_new_tokens=5")
    run(_script("gpt-inspect"), "--init_from=out", "--device=cpu", "--start=First Citizen",
        "--out_dir=inspect")
    assert (tmp_path / "inspect" / "inspect.json").is_file()
