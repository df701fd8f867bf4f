"""The GPU suite (benchmarks/gpu_suite.py) runs end to end on CPU with --dry-run, imports nothing the GPU machine
lacks (trl, datasets, gguf), and its on-device checks hold: member-batched log-likelihoods equal the sequential
adapters', the shared-prompt DPO loss equals the unshared one."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"


def test_gpu_suite_dry_run(tmp_path):
    output = tmp_path / "gpu_suite.json"
    assert run_script(SUITE, "--dry-run", "--output", output) == 0
    payload = json.loads(output.read_text())
    modes = {(row["model"], row["k"], row["mode"]) for row in payload["results"]}
    assert {("tiny", 1, "single"), ("tiny", 1, "batched"), ("tiny", 2, "batched"), ("tiny", 2, "sequential"),
            ("tiny", 2, "dpo_shared"), ("tiny", 2, "dpo_unshared")} <= modes  # fmt: skip
    assert all(row["median_step_s"] > 0 for row in payload["results"])
    if importlib.util.find_spec("bitsandbytes") is not None:  # the 4-bit (NF4) base, as in QLoRA
        assert {("tiny", 1, "batched_nf4"), ("tiny", 2, "batched_nf4")} <= modes
        assert "tiny K=2 batched_nf4 / batched (time)" in payload["ratios"]
    checks = payload["checks"]
    assert any("batched_vs_sequential" in key for key in checks) and any("dpo_shared" in key for key in checks)
    assert all(value < 1e-4 for value in checks.values()), checks
    assert "tiny K=2 batched / sequential" in payload["ratios"]
    assert set(payload["versions"]) >= {"torch", "transformers", "peft"}


def test_gpu_suite_needs_no_trl_or_datasets(tmp_path):
    """The GPU machine has torch, transformers, peft and accelerate only: the suite must run with trl, datasets and
    gguf unimportable."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('trl', 'datasets', 'gguf'):\n"
        "            raise ImportError(f'{name} is not installed on the GPU machine')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(SUITE), "--dry-run", "--output", str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out.json").is_file()
