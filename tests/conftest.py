import os

import pytest
import torch
from click.testing import CliRunner

from k2cli.model.config import ModelConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU, Triton kernels run in Triton's interpreter. The choice is made when a kernel is defined
# (model/triton_kernels.py, on first use), so it is set here, before any test can define one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import datasets

    datasets.disable_progress_bars()
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def artifacts_root(tmp_path, monkeypatch):
    """Every test gets its own artifacts root; nothing touches ./artifacts."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("K2_ARTIFACTS", str(root))
    monkeypatch.setenv("K2_QUIET", "1")
    return root


@pytest.fixture
def k2():
    """Run the CLI in-process: k2("model", "info", ...) -> click Result."""
    from k2cli.cli import cli

    runner = CliRunner()

    def run(*args, ok=True):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        if ok is True:
            assert result.exit_code == 0, result.output
        return result

    return run


def assert_clean_error(result, *words):
    """Bad input: exit status 2, one 'error:' line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    text = result.output
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for w in words:
        assert w.lower() in text.lower(), (w, text)


@pytest.fixture
def tiny_cfg():
    return ModelConfig.from_preset("tiny")
