"""benchmarks/gpu_all.sh, the one command for a lent GPU: every script it names exists and compiles, and its
time keeping holds without a GPU (a stand-in interpreter plays the GPU scripts: each sleeps, writes its JSON,
or hangs): steps run in order under their own limits, a hung step is cut at its limit and the run goes on,
and steps that would start with under 15 s left of the whole run's limit are skipped and listed. At the end
gpu_summary.py (run for real) merges every step into one JSON and prints one table of the targets; it reads
what the real training and decoding scripts write (run on the CPU with a tiny model)."""

from __future__ import annotations

import json
import os
import py_compile
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
script = sys.argv[1]
if script == "gpu_summary.py":
    import os
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
out = Path(sys.argv[sys.argv.index("--out") + 1])
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
    merged = json.loads((out / "all.json").read_text())  # the one JSON: every step, ran, cut or skipped
    assert list(merged["steps"]) == [name for _, name, _ in steps()]
    assert merged["steps"]["gpu_check"] == {"exit_status": 0, "skipped": False, "seconds": merged["steps"][
        "gpu_check"]["seconds"], "result": {"script": "gpu_check.py"}}
    assert merged["steps"]["gpu_train"]["exit_status"] == 124 and merged["steps"]["gpu_train"]["result"] is None
    assert merged["steps"]["gpu_decode"]["skipped"] is True
    assert all(t["met"] is None and t["measured"] is None for t in merged["targets"])  # nothing measured
    assert "unmeasured" in proc.stdout and "skipped: gpu_decode" in proc.stdout


def test_the_table_judges_every_target_from_the_steps_json(tmp_path):
    # every step writes what its script writes on a GPU (the fields the summary reads); an H200-like card:
    # a copy-bandwidth ceiling of 250 tok/s for the 8B weights scales the decode targets by 250/186
    flex = "llamaherd compiled + flex (8 docs/row)"
    results = {
        "gpu_train.py --quick --doc-mask": {"results": {flex: {"tflops": 510.0},
                                                        "llamaherd compiled": {"tflops": 530.0},
                                                        "HF eager": {"tflops": 330.0},
                                                        "HF compiled": {"tflops": 401.0}}},
        "gpu_train.py --quick --seq-len 8192": {"results": {flex: {"tflops": 480.0}}},
        "gpu_decode.py": {"ceiling_tok_per_s": 250.0, "results": {"llamaherd compile=True": {"tok_per_s_median": 230.0},
                                                                  "HF eager": {"tok_per_s_median": 24.0},
                                                                  "HF static + compile": {"tok_per_s_median": 150.0}},
                          "batch_results": {"64": {"tok_per_s_median": 6400.0}}},
        "cpu_quant.py": {"results": {"int8": {"tok_per_s_median": 390.0}, "torchao-int8": {"tok_per_s_median": 350.0}}},
        "gpu_memory.py": {"results": {"peak_gib": 70.5, "plan_gib": 72.1}},
    }
    shim = tmp_path / "python"
    shim.write_text(f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
if sys.argv[1] == "gpu_summary.py":
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
out = Path(sys.argv[sys.argv.index("--out") + 1])
results = {results!r}
line = " ".join(sys.argv[1:])
data = next((v for k, v in results.items() if line.startswith(k)), None)
if data is None:
    sys.exit(3)  # a failing step: the table still comes
out.write_text(json.dumps(data))
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "GPU_ALL_SECONDS": "470"}
    proc = subprocess.run(["bash", str(SUITE), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # the steps without results failed
    merged = json.loads((out / "all.json").read_text())
    got = {t["target"]: t for t in merged["targets"]}
    train = got["train 1B, seq 2,048, document masks"]
    assert (train["measured"], train["goal"], train["met"]) == (510.0, 495.0, True)
    assert (train["peer"], train["peer_value"]) == ("HF compiled", 401.0)  # the best peer of the same run
    assert got["train 1B, seq 8,192, document masks"]["met"] is False
    decode = got["decode 8B bf16, batch 1"]
    assert decode["goal"] == pytest.approx(170 * 250 / 186) and decode["met"] is True
    assert decode["peer"] == "HF static + compile"
    assert got["decode 8B int8, batch 1"]["goal"] == pytest.approx(300 * 250 / 186)
    assert got["decode 8B int8, batch 1"]["met"] is False  # 390 < 403
    int8 = got["decode 8B int8, batch 1"]
    assert (int8["peer"], int8["peer_value"]) == ("torchao-int8", 350)
    assert got["decode 8B bf16, batch 64"]["measured"] == 6400.0 and got["decode 8B bf16, batch 64"]["goal"] is None
    assert got["train 8B, seq 8,192, one 80 GB GPU: peak"]["met"] is True
    table = proc.stdout[proc.stdout.index("| target"):]
    assert "| train 1B, seq 2,048, document masks" in table and "HF compiled: 401.0" in table
    assert "failed: gpu_check" in table and (out / "targets.txt").read_text().startswith("| target")


@pytest.mark.slow
def test_the_summary_reads_what_the_real_scripts_write(tmp_path):
    # gpu_train.py and gpu_decode.py run for real on the CPU with a tiny model; the summary finds their numbers
    bench = ROOT / "benchmarks"
    runs = {"gpu_train": ["gpu_train.py", "--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "64",
                          "--amp", "none", "--ours", "flex", "--no-hf-compile", "--quick", "--doc-mask"],
            "gpu_decode": ["gpu_decode.py", "--device", "cpu", "--preset", "tiny", "--dtype", "float32",
                           "--no-compile", "--no-hf", "--new-tokens", "8", "--batches", "64"]}
    table = []
    for name, cmd in runs.items():
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / f"{name}.json")], cwd=bench,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        table.append(f"{name}\t0\t{time.monotonic() - t0:.0f}\n")
    (tmp_path / "steps.tsv").write_text("".join(table))
    proc = subprocess.run([sys.executable, "gpu_summary.py", "--dir", str(tmp_path),
                           "--out", str(tmp_path / "all.json")], cwd=bench, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = {t["target"]: t for t in json.loads((tmp_path / "all.json").read_text())["targets"]}
    train = got["train 1B, seq 2,048, document masks"]
    assert train["measured"] > 0 and train["met"] is False and train["peer"] == "HF eager"
    decode = got["decode 8B bf16, batch 1"]
    assert decode["measured"] > 0 and decode["goal"] > 0  # the CPU's copy bandwidth scales the target
    assert got["decode 8B bf16, batch 64"]["measured"] > decode["measured"]  # 64 rows at once beat one
