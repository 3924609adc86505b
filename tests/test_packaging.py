"""The installed distribution is one import namespace, `prefixdpo`, and lives beside Hugging
Face's stack: our folders never shadow an installed package of the same name (Hugging Face's
`kernels`, which transformers imports), and the installed packages never shadow ours."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "train", "kernels")
# Every script with a `__main__` (benchmarks/measure.py is a module the benchmarks import).
ENTRY_POINTS = sorted(path for path in [REPO / "train.py", *REPO.glob("scripts/*.py"),
                                        *REPO.glob("benchmarks/*.py")]
                      if 'if __name__ == "__main__":' in path.read_text())


def python(code: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_our_modules_import_from_a_scratch_folder_beside_hugging_faces_kernels(tmp_path):
    process = python(f"""
import kernels
import prefixdpo.kernels.log_probs, prefixdpo.model.transformer, prefixdpo.data.loader
import prefixdpo.train.loop
from pathlib import Path
repo = Path({str(REPO)!r})
assert not Path(kernels.__file__).is_relative_to(repo / "kernels"), kernels.__file__  # HF's
assert hasattr(kernels, "get_kernel"), dir(kernels)
assert Path(prefixdpo.kernels.log_probs.__file__) == repo / "kernels" / "log_probs.py"
print("ok")
""", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "ok"


def test_transformers_runs_a_model_in_a_python_started_at_the_repository_root():
    """The root is first on sys.path there; its `kernels/` folder must not be what
    `import kernels` finds (transformers needs Hugging Face's)."""
    process = python("""
import kernels, torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import hub_kernels  # imports Hugging Face's kernels package
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
logits = LlamaForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
print(kernels.__file__)
""", cwd=REPO)
    assert process.returncode == 0, process.stderr
    assert not Path(process.stdout.strip()).is_relative_to(REPO / "kernels")


def test_every_entry_point_starts_from_a_scratch_folder(tmp_path):
    """`python PATH --help` from elsewhere, for train.py and every script and benchmark: the
    script's own folder is first on sys.path, so one that imported a bare `kernels` or `data`
    would get the wrong package here. The scripts start side by side (each imports torch)."""
    processes = {script: subprocess.Popen([sys.executable, str(script), "--help"], cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
                 for script in ENTRY_POINTS}
    assert len(processes) >= 10
    for script, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{script}: {err[-3000:]}"
        assert "usage:" in out, script


def test_a_regular_install_holds_the_namespace_and_nothing_at_the_top(tmp_path):
    """The wheel a regular `pip install .` installs: every module under prefixdpo/, no
    top-level `model`, `data`, `train` or `kernels`; imported from the unpacked wheel alone, a
    kernel computes."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ beside it
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = python(f"""
from setuptools import build_meta
print(build_meta.build_wheel({str(tmp_path)!r}))
""", cwd=source)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = tmp_path / build.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    expected = sorted(f"prefixdpo/{package}/{path.relative_to(REPO / package).as_posix()}"
                      for package in PACKAGES for path in (REPO / package).rglob("*.py"))
    assert sorted(modules) == expected
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    process = python(f"""
import torch
import prefixdpo.kernels.log_probs as log_probs
from pathlib import Path
assert Path(log_probs.__file__).is_relative_to({str(unpacked)!r}), log_probs.__file__
hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
targets = torch.tensor([1, 2, 3, 4, 5])
got = log_probs.linear_log_probs(hidden, weight, targets)
want = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
torch.testing.assert_close(got, want)
print("ok")
""", cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(unpacked)})
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip() == "ok"
