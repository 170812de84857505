"""benchmarks/gpu_all.sh, the one command for a lent GPU: every script it names exists and compiles, and its
time keeping holds without a GPU (a stand-in interpreter plays the GPU scripts: each sleeps, writes its JSON,
or hangs): steps run in order under their own limits, a hung step is cut at its limit and the run goes on,
and steps that would start with under 15 s left of the whole run's limit are skipped and listed."""

from __future__ import annotations

import os
import py_compile
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_all.sh"


def steps() -> list[tuple[int, str, str]]:
    """(limit, name, script) of every `step` line of gpu_all.sh, in order."""
    found = re.findall(r"^step (\d+) (\S+) (\S+\.py)", SUITE.read_text(), flags=re.M)
    return [(int(limit), name, script) for limit, name, script in found]


def test_every_step_names_a_script_that_compiles_and_the_limits_fit_8_minutes():
    names = [name for _, name, _ in steps()]
    assert names[:3] == ["gpu_check", "gpu_train", "gpu_decode"]  # what the targets need most, first
    assert {"gpu_quant", "gpu_chunked_loss", "gpu_speculative", "gpu_memory", "gpu_fsdp", "gpu_serve",
            "gpu_posttrain"} <= set(names)
    for _, name, script in steps():
        path = ROOT / "benchmarks" / script
        assert path.is_file(), f"{name}: {script} is missing"
        py_compile.compile(str(path), doraise=True)
        assert "--out" in path.read_text(), f"{script} must accept --out"
    assert re.search(r"total=\$\{GPU_ALL_SECONDS:-(\d+)\}", SUITE.read_text()).group(1) == "470"  # < 8 min


def test_time_keeping_cuts_a_hung_step_and_skips_what_no_longer_fits(tmp_path):
    # the stand-in: gpu_check writes its JSON at once, gpu_train hangs, every other step takes 1 s
    shim = tmp_path / "python"
    shim.write_text(f"""#!{sys.executable}
import sys, time
from pathlib import Path
script, out = sys.argv[1], Path(sys.argv[sys.argv.index("--out") + 1])
if script == "gpu_train.py":
    time.sleep(3600)
time.sleep(0 if script == "gpu_check.py" else 1)
out.write_text('{{"script": "%s"}}' % script)
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "GPU_ALL_SECONDS": "20"}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SUITE), str(out)], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1  # the hung step failed the run, which still went on
    assert "gpu_check: exit status 0" in summary and (out / "gpu_check.json").is_file()
    assert "gpu_train: exit status 124" in summary  # cut by its limit: what was left of 20 s
    assert not (out / "gpu_train.json").exists()
    for _, name, _ in steps()[2:]:
        assert f"{name}: skipped" in summary  # under 15 s left after the hung step
    assert took < 20 + 10 and "=== all:" in summary
