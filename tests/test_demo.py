"""make demo works on this machine and proves its own totals."""
import os
import subprocess
import sys

from conftest import ROOT, clean_env


def test_demo_runs_and_every_second_arrives():
    env = clean_env(FLOWFORGE_DEMO_CLEANUP="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every tracked second reached the team report: yes" in proc.stdout
    assert "0 conflicts" in proc.stdout and "EUR" in proc.stdout
