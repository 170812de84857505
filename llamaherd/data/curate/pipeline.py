"""The curation pipeline: raw text through an ordered list of stages into kept/ and removed/ shards.

    herd data curate [RECIPE] --input PATH... --out DIR [--stages a,b,c] [--workers N] [key=value ...]

    DIR/kept/shard_00000.jsonl[.gz|.zst]      {"id", "text", "source", "meta"}: what every stage kept
    DIR/removed/shard_00000.jsonl[.gz|.zst]   the same records + "stage", "reason" (+ "duplicate_of")
    DIR/stats.json                            per stage, in order: documents and bytes in / kept / removed
                                              by reason, seconds; the input's skipped lines; the totals
    DIR/pipeline.json                         the stages, parameters and inputs DIR was made with

How it runs. The input is cut, in order, into shards of ``output.shard_docs`` documents; shard k of the
input becomes ``kept/shard_k`` and ``removed/shard_k``. Document stages (a filter, ``normalize``,
``pii``) see one record at a time, so shards go through them in parallel worker processes. A global
stage (the dedups) needs every document: the workers compute what it needs of their shard (e.g. hashes,
``scan``), the main process decides for all shards at once (``plan``), and the workers of the next
segment of stages carry out those decisions (``apply``). Every unit of work (a segment of stages on one
shard) writes its files under ``DIR/.work`` and renames them into place when complete, its stats
last: a run that is killed loses no finished unit, and running the same command again skips those and
ends with byte-identical output. ``.work`` is deleted when the run completes.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import time
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError

# the stage names (a contract) -> the module of llamaherd.data.curate that holds each stage
STAGE_NAMES = ("normalize", "url_filter", "language", "gopher_quality", "gopher_repetition", "c4_quality",
               "fineweb_quality", "dup_ngram_coverage", "token_outlier", "nsfw", "pii", "exact_dedup",
               "url_dedup", "line_dedup", "minhash_dedup", "semantic_dedup", "quality", "domain", "mix")
COMPRESSIONS = {"none": ".jsonl", "gzip": ".jsonl.gz", "zstd": ".jsonl.zst"}
WORK = ".work"


def available_stages() -> list[str]:
    """The stage names whose module exists in this version, in pipeline order."""
    here = Path(__file__).parent
    return [name for name in STAGE_NAMES if (here / f"{name}.py").is_file()]


def stage_class(name: str) -> type:
    """The dataclass of stage ``name``; a one-line error for a name that is not a stage (yet)."""
    if name not in STAGE_NAMES or name not in available_stages():
        known = ", ".join(available_stages())
        more = " (a stage still to come)" if name in STAGE_NAMES else ""
        raise HerdError(f"unknown curation stage {name!r}{more}; expected one of: {known}")
    module = importlib.import_module(f"llamaherd.data.curate.{name}")
    for obj in vars(module).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and getattr(obj, "name", None) == name:
            return obj
    raise RuntimeError(f"llamaherd.data.curate.{name} defines no stage dataclass named {name!r}")


def is_global(stage) -> bool:
    return getattr(stage, "scope", "document") == "global"


# --- building a pipeline from a recipe ----------------------------------------------------------------

@dataclass
class Pipeline:
    stages: list  # stage objects, in order
    compression: str = "none"  # of kept/ and removed/: none, gzip, zstd
    shard_docs: int = 10_000  # documents per shard (the unit of parallel work and of resuming)

    def describe(self) -> dict:
        """The pipeline as plain JSON: what pipeline.json records."""
        stages = [{"name": s.name, **{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}} for s in self.stages]
        return {"stages": stages, "output": {"compression": self.compression, "shard_docs": self.shard_docs}}

    def segments(self) -> list[tuple[list, object | None]]:
        """The stages cut after each global stage: [(document stages, the global stage ending them or None)]."""
        out, docs = [], []
        for stage in self.stages:
            if is_global(stage):
                out.append((docs, stage))
                docs = []
            else:
                docs.append(stage)
        out.append((docs, None))
        return out


def _parse(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _coerce(value, typ, where: str):
    """A recipe or command-line value checked against a stage parameter's type (``int | None`` etc.)."""
    options = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None):
            if value is None:
                return None
        elif base is bool:
            if isinstance(value, bool):
                return value
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif base in (list, tuple):
            if isinstance(value, (list, tuple)):
                return list(value)
        elif base is dict:
            if isinstance(value, dict):
                return value
        elif isinstance(value, base):
            return value
    names = " or ".join("null" if o is type(None) else getattr(typing.get_origin(o) or o, "__name__", str(o))
                        for o in options)
    raise HerdError(f"{where}: expected {names}, got {value!r}")


def make_stage(name: str, params: dict | None = None, where: str | None = None):
    """Stage ``name`` with ``params`` (unknown or ill-typed parameters are one-line errors)."""
    cls = stage_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (params or {}).items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise HerdError(f"{where or name}: unknown parameter {key!r} of stage {name!r}; expected one of: {known}")
        values[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**values)


def _stage_tables(tables, where: str) -> list[tuple[str, dict]]:
    """[(stage name, parameters)] from a recipe's stage tables ({"name": ..., param: value, ...})."""
    if not isinstance(tables, list):
        raise HerdError(f"{where}: stages must be a list of tables with a name, got {tables!r}")
    spec = []
    for i, table in enumerate(tables):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise HerdError(f"{where}: stages[{i}] needs a name = \"...\"")
        spec.append((table["name"], {k: v for k, v in table.items() if k != "name"}))
    return spec


def load_pipeline(recipe: str | os.PathLike | None = None, stages: list[str] | None = None,
                  overrides: list[str] | None = None) -> Pipeline:
    """A pipeline from a TOML recipe (``[[stages]]`` tables with a ``name`` and parameters, and an
    ``[output]`` table), or the stages named in ``stages`` with their defaults, or every available stage;
    then ``stage.param=value`` / ``output.key=value`` overrides. Every problem is found before any work."""
    spec: list[tuple[str, dict]] = []
    output: dict = {}
    where = "pipeline"
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise HerdError(f"{path}: pipeline recipe not found (a TOML file with [[stages]] tables)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise HerdError(f"{path}: not valid TOML ({e})") from None
        unknown = sorted(set(data) - {"stages", "output"})
        if unknown:
            raise HerdError(f"{path}: unknown table(s) {', '.join(unknown)}; expected [[stages]] and [output]")
        where = str(path)
        spec = _stage_tables(data.get("stages", []), where)
        output = dict(data.get("output", {}))
    if stages is not None:
        spec = [(name, {}) for name in stages]
    elif recipe is None:
        spec = [(name, {}) for name in available_stages()]
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        target, dot, param = key.strip().partition(".")
        if not sep or not dot or not param:
            raise HerdError(f"override {item!r} must look like stage.param=value or output.key=value")
        if target == "output":
            output[param] = _parse(raw.strip())
            continue
        matches = [params for name, params in spec if name == target]
        if not matches:
            stage_class(target)  # an unknown stage name says so
            raise HerdError(f"override {item!r}: stage {target!r} is not in this pipeline "
                            f"({', '.join(name for name, _ in spec) or 'no stages'})")
        for params in matches:
            params[param] = _parse(raw.strip())
    return build_pipeline(spec, output, where)


def pipeline_from_tables(tables: list, output: dict | None = None, where: str = "stages") -> Pipeline:
    """A pipeline from stage tables as a recipe holds them (``[{"name": "exact_dedup"}, ...]``) and an
    output table; what `herd run` curates its corpus with (``curate.stages``)."""
    return build_pipeline(_stage_tables(tables, where), dict(output or {}), where)


def build_pipeline(spec: list[tuple[str, dict]], output: dict, where: str) -> Pipeline:
    """Stages from (name, parameters) pairs and the output settings, every one checked."""
    built = [make_stage(name, params, where) for name, params in spec]
    names = [s.name for s in built]
    if len(set(names)) != len(names):
        raise HerdError(f"{where}: a stage appears twice ({', '.join(names)})")
    unknown = sorted(set(output) - {"compression", "shard_docs"})
    if unknown:
        raise HerdError(f"unknown output setting(s) {', '.join(unknown)}; expected output.compression, "
                        "output.shard_docs")
    compression = output.get("compression", "none")
    if compression not in COMPRESSIONS:
        raise HerdError(f"output.compression: {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
    shard_docs = output.get("shard_docs", 10_000)
    if not isinstance(shard_docs, int) or isinstance(shard_docs, bool) or shard_docs < 1:
        raise HerdError(f"output.shard_docs: expected an integer >= 1, got {shard_docs!r}")
    if compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise HerdError("output.compression = \"zstd\" needs the zstandard package (pip install zstandard)") \
                from None
    return Pipeline(built, compression, shard_docs)


# --- files ---------------------------------------------------------------------------------------------

def _writer(path: Path, compression: str):
    """A binary file for JSONL records, compressed deterministically (no time or name in a gzip header)."""
    raw = open(path, "wb")
    if compression == "gzip":
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0), raw
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False), raw
    return raw, raw


def write_records(path: Path, records: Iterable[dict], compression: str = "none") -> None:
    """JSONL records written to a temporary file that is renamed to ``path`` once complete."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    f, raw = _writer(tmp, compression)
    try:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        f.close()
        if raw is not f:
            raw.close()
        os.replace(tmp, path)
    finally:
        raw.close()
        tmp.unlink(missing_ok=True)


def read_records(path: Path) -> Iterator[dict]:
    """The records of a shard written by ``write_records`` (any compression)."""
    name = path.name
    if name.endswith(".gz"):
        f = gzip.open(path, "rb")
    elif name.endswith(".zst"):
        import zstandard

        f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True))
    else:
        f = open(path, "rb")
    with f:
        for line in f:
            yield json.loads(line)


def _dump(path: Path, obj, as_json: bool = False) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if as_json:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    else:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _load(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


# --- one unit of work: a segment of stages on one shard --------------------------------------------------

@dataclass
class _Tally:
    """What one stage did to the records it saw: counts and bytes in / kept / removed by reason."""

    docs_in: int = 0
    bytes_in: int = 0
    kept: int = 0
    kept_bytes: int = 0
    bytes_out: int = 0  # of the kept records after the stage (stages may change the text)
    added: int = 0  # extra copies of kept records (mix's up-sampling), which the next stage reads too
    removed: dict = field(default_factory=dict)
    removed_bytes: dict = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, other: "_Tally") -> None:
        for f in ("docs_in", "bytes_in", "kept", "kept_bytes", "bytes_out", "added", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for reason, n in other.removed.items():
            self.removed[reason] = self.removed.get(reason, 0) + n
            self.removed_bytes[reason] = self.removed_bytes.get(reason, 0) + other.removed_bytes[reason]

    def as_dict(self, name: str) -> dict:
        order = sorted(self.removed)
        documents = {"in": self.docs_in, "kept": self.kept, "removed": {r: self.removed[r] for r in order}}
        if self.added:
            documents["added_copies"] = self.added
        return {"name": name, "documents": documents,
                "bytes": {"in": self.bytes_in, "kept": self.kept_bytes, "removed": {r: self.removed_bytes[r]
                                                                                   for r in order},
                          "kept_after": self.bytes_out},
                "seconds": round(self.seconds, 3)}


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _route(name: str, records: list[Record], outcomes, removed: list[dict], tally: _Tally,
           sizes: list[int]) -> tuple[list[Record], list[int]]:
    """Split ``records`` by ``outcomes`` ((reason or None, extra) per record) into the survivors and
    ``removed`` (appended), counting into ``tally``; ``sizes`` are the input sizes. Returns the survivors
    and their sizes after the stage (the next stage's input sizes: each text is measured once per
    stage). A kept record whose extra says ``{"copies": k}`` is kept k times in a row."""
    kept, kept_sizes = [], []
    for record, (reason, extra), size in zip(records, outcomes, sizes, strict=True):
        tally.docs_in += 1
        tally.bytes_in += size
        if reason is None:
            copies = (extra or {}).get("copies", 1)
            after = _nbytes(record.text)
            kept += [record] * copies
            kept_sizes += [after] * copies
            tally.kept += 1
            tally.added += copies - 1
            tally.kept_bytes += size
            tally.bytes_out += after * copies
        else:
            removed.append({**record.to_dict(), "stage": name, "reason": reason, **(extra or {})})
            tally.removed[reason] = tally.removed.get(reason, 0) + 1
            tally.removed_bytes[reason] = tally.removed_bytes.get(reason, 0) + size
    return kept, kept_sizes


def _unit_dir(out: Path, seg: int) -> Path:
    return out / WORK / f"seg{seg}"


def _shard_name(shard: int, compression: str) -> str:
    return f"shard_{shard:05d}{COMPRESSIONS[compression]}"


def run_unit(pipeline: Pipeline, out: Path, seg: int, shard: int, records: list[Record] | None = None) -> None:
    """Segment ``seg`` of the pipeline on shard ``shard``: the previous global stage's decisions, the
    document stages, then the next global stage's scan (or, in the last segment, the kept shard)."""
    segments = pipeline.segments()
    stages, ending = segments[seg]
    here = _unit_dir(out, seg)
    tallies: list[tuple[str, _Tally]] = []
    removed: list[dict] = []
    sizes = [_nbytes(r.text) for r in records] if records is not None else None
    if seg > 0:
        prev = _unit_dir(out, seg - 1)
        records = [Record.from_dict(r) for r in read_records(prev / f"keep_{shard:05d}.jsonl")]
        stage = segments[seg - 1][1]
        tally = _Tally()
        sizes = [_nbytes(r.text) for r in records]
        start = time.perf_counter()
        outcomes = stage.apply(records, _load(prev / f"decision_{shard:05d}.pkl"))
        records, sizes = _route(stage.name, records, outcomes, removed, tally, sizes)
        tally.seconds = time.perf_counter() - start
        tallies.append((stage.name, tally))
    for stage in stages:
        tally = _Tally()
        start = time.perf_counter()
        reasons = stage.batch(records) if hasattr(stage, "batch") else [stage(r) for r in records]
        outcomes = [(reason, None) for reason in reasons]
        records, sizes = _route(stage.name, records, outcomes, removed, tally, sizes)
        tally.seconds = time.perf_counter() - start
        tallies.append((stage.name, tally))
    scan_seconds = 0.0
    if ending is not None:
        start = time.perf_counter()
        _dump(here / f"scan_{shard:05d}.pkl", ending.scan(records))
        scan_seconds = time.perf_counter() - start
        write_records(here / f"keep_{shard:05d}.jsonl", (r.to_dict() for r in records))
    else:
        write_records(out / "kept" / _shard_name(shard, pipeline.compression), (r.to_dict() for r in records),
                      pipeline.compression)
    write_records(here / f"removed_{shard:05d}", removed, pipeline.compression)
    stats = {"stages": [[name, dataclasses.asdict(t)] for name, t in tallies], "scan_seconds": scan_seconds,
             "kept": len(records)}
    _dump(here / f"done_{shard:05d}.json", stats, as_json=True)  # last: the unit is complete


def _first_unit(pipeline: Pipeline, out: Path, shard: int, docs: list[Record]) -> dict:
    """Segment 0 on a shard of input documents; returns what it read (for the input totals)."""
    read = {"documents": len(docs), "bytes": sum(_nbytes(d.text) for d in docs)}  # before stages change them
    run_unit(pipeline, out, 0, shard, docs)
    return read


# --- the whole run ---------------------------------------------------------------------------------------

def _end_with(pid: int) -> None:
    """In a worker: exit when process ``pid`` (the run's main process) is gone, e.g. killed with SIGKILL,
    rather than wait forever for work that will never come."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, under another user
                pass

    threading.Thread(target=watch, daemon=True, name="end-with-main").start()


class _RayExecutor(Executor):
    """Units of work as Ray tasks: a local Ray (``ray.init()``) or a cluster at ``address``. Tasks write their
    files under the output directory as local workers do, so on a cluster it must be on a shared
    filesystem; the output is byte-identical to the local executor's."""

    def __init__(self, address: str | None, workers: int):
        try:
            import ray
        except ImportError:
            raise HerdError("--executor ray needs Ray (pip install 'llamaherd[ray]')") from None
        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except Exception as e:  # a cluster that cannot be reached, for one
                raise HerdError(f"Ray: cannot start or join {address or 'a local Ray'} "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.tasks: dict = {}

    def submit(self, fn, /, *args, **kwargs) -> Future:
        task = self.tasks.setdefault(fn, self.ray.remote(fn))
        return task.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


class _Inline(Executor):
    """Runs each submitted call at once, in this process (one worker: no pool to start)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever waits on the future, as a pool would
            future.set_exception(e)
        return future


def _chunks(docs: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def curate(pipeline: Pipeline, inputs, out_dir: str | os.PathLike, *, text_field: str = "text", workers: int = 0,
           executor: str = "local", ray_address: str | None = None,
           progress: Callable[[str, int, int | None], None] | None = None) -> dict:
    """Run ``pipeline`` on ``inputs`` (what ``read_documents`` reads) into ``out_dir``; returns stats.json's
    content. ``executor`` "local": ``workers`` processes (0: one per core; 1: in this process); "ray":
    Ray tasks (a local Ray with ``workers`` CPUs, or the cluster at ``ray_address``).
    ``progress(segment, done, total)`` hears about every finished unit. Running it again on the same
    ``out_dir`` resumes."""
    from llamaherd.data.sources import read_documents, resolve_inputs

    out = Path(out_dir)
    if executor not in ("local", "ray"):
        raise HerdError(f"executor {executor!r}: expected local or ray")
    files = resolve_inputs(inputs)  # a wrong path is an error before anything is written
    described = {**pipeline.describe(), "inputs": files, "text_field": text_field}
    _prepare(out, described)
    if (out / "stats.json").is_file():
        return json.loads((out / "stats.json").read_text())
    workers = workers or os.cpu_count() or 1
    segments = pipeline.segments()
    for seg in range(len(segments)):
        _unit_dir(out, seg).mkdir(parents=True, exist_ok=True)
    (out / "kept").mkdir(exist_ok=True)
    (out / "removed").mkdir(exist_ok=True)
    t_run = time.perf_counter()
    skipped: list[dict] = []

    def on_error(where: str, message: str) -> None:
        skipped.append({"where": where, "error": message})

    if executor == "ray":
        pool: Executor = _RayExecutor(ray_address, workers)
    else:
        # forkserver: workers forked from a fresh interpreter, never from this process, whose threads (torch's
        # OpenMP pool, for one) a forked child could deadlock on; each ends soon after this process does
        pool = _Inline() if workers == 1 else ProcessPoolExecutor(
            workers, mp_context=mp.get_context("forkserver"), initializer=_end_with, initargs=(os.getpid(),))
    with pool:
        # segment 0 on the input, read in order and cut into shards as it is read
        input_file = out / WORK / "input.json"
        if input_file.is_file():
            read = json.loads(input_file.read_text())
            n_shards = read["shards"]
        else:
            docs = read_documents(files, text_field, on_error=on_error, keep_fields=True)
            records = (Record(d.id, d.text, d.source, dict(d.meta)) for d in docs)
            pending: list[tuple[int, Future | None]] = []
            n_shards = totals_docs = totals_bytes = 0
            done_units = 0
            for shard, chunk in enumerate(_chunks(records, pipeline.shard_docs)):
                n_shards = shard + 1
                if (_unit_dir(out, 0) / f"done_{shard:05d}.json").is_file():
                    totals_docs += len(chunk)
                    totals_bytes += sum(_nbytes(r.text) for r in chunk)
                    done_units += 1
                    continue
                pending.append((shard, pool.submit(_first_unit, pipeline, out, shard, chunk)))
                while len(pending) > 2 * workers or (pending and pending[0][1].done()):
                    _, future = pending.pop(0)
                    read_now = future.result()
                    totals_docs, totals_bytes = totals_docs + read_now["documents"], totals_bytes + read_now["bytes"]
                    done_units += 1
                    if progress:
                        progress(_segment_label(segments, 0), done_units, None)
            for _, future in pending:
                read_now = future.result()
                totals_docs, totals_bytes = totals_docs + read_now["documents"], totals_bytes + read_now["bytes"]
                done_units += 1
                if progress:
                    progress(_segment_label(segments, 0), done_units, n_shards)
            read = {"documents": totals_docs, "bytes": totals_bytes, "shards": n_shards, "skipped": skipped}
            _dump(input_file, read, as_json=True)
        # the global stages' plans, and the segments after them
        for seg in range(1, len(segments)):
            _plan(segments[seg - 1][1], out, seg - 1, n_shards)
            futures = [(shard, pool.submit(run_unit, pipeline, out, seg, shard)) for shard in range(n_shards)
                       if not (_unit_dir(out, seg) / f"done_{shard:05d}.json").is_file()]
            for i, (_, future) in enumerate(futures, 1):
                future.result()
                if progress:
                    progress(_segment_label(segments, seg), n_shards - len(futures) + i, n_shards)
    stats = _finish(pipeline, out, segments, n_shards, read, time.perf_counter() - t_run)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return stats


def _segment_label(segments, seg: int) -> str:
    names = [s.name for s in segments[seg][0]] + ([segments[seg][1].name] if segments[seg][1] else [])
    if seg > 0:
        names.insert(0, f"{segments[seg - 1][1].name} (apply)")
    return ", ".join(names) or "write"


def _plan(stage, out: Path, seg: int, n_shards: int) -> None:
    """The global ``stage``'s decisions for every shard, from every shard's scan (once; kept on disk)."""
    here = _unit_dir(out, seg)
    marker = here / "plan.json"
    if marker.is_file():
        return
    start = time.perf_counter()
    decisions = stage.plan([_load(here / f"scan_{shard:05d}.pkl") for shard in range(n_shards)])
    for shard, decision in enumerate(decisions):
        _dump(here / f"decision_{shard:05d}.pkl", decision)
    # a stage may say what its plan achieved (mix: the proportions), for stats.json
    _dump(marker, {"seconds": time.perf_counter() - start, "summary": getattr(stage, "summary", None)}, as_json=True)


def _prepare(out: Path, described: dict) -> None:
    """Create ``out`` for this pipeline, or check that it was made by the same one; clear half-written files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HerdError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    record = out / "pipeline.json"
    if record.is_file():
        theirs = json.loads(record.read_text())
        if theirs != json.loads(json.dumps(described)):
            raise HerdError(f"{out} was curated with another pipeline or other inputs (see {record}); "
                            "use another --out, or delete it")
    else:
        leftovers = [p.name for p in out.iterdir()]
        if leftovers:
            raise HerdError(f"{out}: not empty and not a curation output ({', '.join(sorted(leftovers)[:3])}); "
                            "use another --out")
        _dump(record, described, as_json=True)
    for tmp in out.rglob("*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _finish(pipeline: Pipeline, out: Path, segments, n_shards: int, read: dict, seconds: float) -> dict:
    """removed/ shards (each unit's removals, in stage order, as one file) and stats.json."""
    tallies = {s.name: _Tally() for s in pipeline.stages}
    summaries = {}
    for seg in range(len(segments)):
        here = _unit_dir(out, seg)
        for shard in range(n_shards):
            unit = json.loads((here / f"done_{shard:05d}.json").read_text())
            for name, t in unit["stages"]:
                tallies[name].add(_Tally(**t))
            if segments[seg][1] is not None:
                tallies[segments[seg][1].name].seconds += unit["scan_seconds"]
        if segments[seg][1] is not None:
            plan = json.loads((here / "plan.json").read_text())
            tallies[segments[seg][1].name].seconds += plan["seconds"]
            if plan.get("summary") is not None:
                summaries[segments[seg][1].name] = plan["summary"]
    kept_docs = kept_bytes = removed_docs = removed_bytes = 0
    for shard in range(n_shards):
        name = _shard_name(shard, pipeline.compression)
        tmp = out / "removed" / f"{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:  # compressed streams concatenate into one valid stream (gzip members, zstd frames)
            for seg in range(len(segments)):
                with open(_unit_dir(out, seg) / f"removed_{shard:05d}", "rb") as part:
                    shutil.copyfileobj(part, f)
        os.replace(tmp, out / "removed" / name)
    stages = [{**tallies[s.name].as_dict(s.name), **({"summary": summaries[s.name]} if s.name in summaries else {})}
              for s in pipeline.stages]
    for s in pipeline.stages:
        t = tallies[s.name]
        removed_docs += sum(t.removed.values())
        removed_bytes += sum(t.removed_bytes.values())
    if pipeline.stages:
        last = tallies[pipeline.stages[-1].name]
        kept_docs, kept_bytes = last.kept + last.added, last.bytes_out
    else:
        kept_docs, kept_bytes = read["documents"], read["bytes"]
    stats = {"input": {"documents": read["documents"], "bytes": read["bytes"],
                       "skipped": {"count": len(read["skipped"]), "lines": read["skipped"][:1000]}},
             "stages": stages,
             "output": {"kept": {"documents": kept_docs, "bytes": kept_bytes},
                        "removed": {"documents": removed_docs, "bytes": removed_bytes}, "shards": n_shards,
                        "compression": pipeline.compression},
             "seconds": round(seconds, 3)}
    _dump(out / "stats.json", stats, as_json=True)
    return stats
