"""Project rules that a test can hold: pure cores, README commands, CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PURE = [
    "livetrain.config",
    "livetrain.messages",
    "livetrain.actors.replay_buffer",
    "livetrain.actors.schema",
    "livetrain.actors.manifest",
    "livetrain.actors.quarantine",
    "livetrain.actors.synthetic",
    "livetrain.actors.sources",
    "livetrain.training.gate",
    "livetrain.training.registry",
    "livetrain.training.learner",
    "livetrain.training.models",
    "livetrain.training.checkpoint",
    "livetrain.training.drift",
    "livetrain.serving.predictor",
]


def test_pure_modules_never_import_ray():
    code = "import sys\n" + "".join(f"import {m}\n" for m in PURE) + "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()
    assert demo.endswith("livetrain demo") and "torch==2.13.0" in demo
    assert tests.endswith("pytest") and "torch==2.13.0" in tests


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text()
