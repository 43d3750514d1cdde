"""The README's two commands are what a new user runs, and what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_starts_with_the_main_job_and_the_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert "fluxmesh demo" in main_job and "torch==2.13.0" in main_job
    assert "pytest" in tests and "torch==2.13.0" in tests


def test_ci_runs_the_readme_test_command():
    tests = _bash_blocks((ROOT / "README.md").read_text())[1].strip()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
