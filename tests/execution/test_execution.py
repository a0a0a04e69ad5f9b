"""Scale-out execution (issue 7): executors, shipping, determinism, lost workers, resume.

The statistics of a pass must not depend on where the chunks ran: the synchronous run, local
worker processes (forked or spawned), a LocalCluster of 1, 2 or 4 processes, and runs
interrupted and resumed must agree to 1e-10
relative (they are in fact identical: chunks are computed from the same inputs with the same
finufft thread count, 1, and reduced in a fixed order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cryomag.execution import ExecutorConfig, LocalExecutor, make_chunks, make_executor
from cryomag.execution.checkpoint import CheckpointExecutor
from cryomag.execution.dask import DaskExecutor
from cryomag.execution.payload import Payload, load_blob
from cryomag.execution.processes import MAX_TRIES, ProcessExecutor, fork_available
from cryomag.fit.bands import make_bands
from cryomag.fit.passes import GroupPass, PassSpec, StatisticsPass
from cryomag.io import ImageSource, read_particles
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset
from cryomag.workflows.estimate import EstimateOptions, estimate, load_references, run_estimate
from tests.data_paths import REPO

RTOL = 1e-10
OPTS = {"fit": ("scale", "aniso"), "max_iter": 2, "tol": 0.0, "chunk_size": 16, "nthreads": 1}


def sim_config(n: int = 160, seed: int = 3) -> SimulationConfig:
    """Two optics groups (box 48 and 40), a few hundred particles: seconds to simulate."""
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            name="a", pixel_size_A=2.0, aniso=[1.01, 0.99, 30.0], box=48, n_particles=n // 2
        ),
        OpticsGroupConfig(name="b", pixel_size_A=2.2, box=40, n_particles=n - n // 2),
    ]
    for g in cfg.optics_groups:
        g.particles_per_micrograph = 20
    cfg.defocus.min_um, cfg.defocus.max_um = 0.6, 1.2
    cfg.noise.snr = 0.3
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 60.0, 800
    cfg.render.n_workers = 1
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exec_sim")
    simulate_dataset(sim_config(), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def inputs(data):
    ps = read_particles(data / "particles.star")
    opts = EstimateOptions(**OPTS)
    refs, _ = load_references(data / "ref.mrc", eps=opts.eps, nthreads=1)
    return ps, refs, opts


def _labels(ps):
    """Each particle's optics group number (the chunks' label)."""
    return ps.particles["rlnOpticsGroup"].to_numpy(int)


def run(inputs, executor=None, on_running=None):
    ps, refs, opts = inputs
    return run_estimate(ps, refs, ImageSource(ps), opts, None, False, executor=executor,
                        on_running=on_running)  # fmt: skip


class _RecordingLocal(LocalExecutor):
    """The synchronous executor, recording its maps and results in ``events``."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def map(self, fn, chunks, *args, on_result=None, **kwargs):
        self.events.append("map")

        def record(chunk, res):
            self.events.append("result")
            on_result(chunk, res)

        return super().map(fn, chunks, *args, on_result=record, **kwargs)


RUN_EVENTS: list[str] = []


@pytest.fixture(scope="module")
def reference(inputs):
    """The synchronous run (finufft with 1 thread, as in the workers); its executor's maps
    and results and the ``on_running`` hook recorded in RUN_EVENTS."""
    return run(inputs, _RecordingLocal(RUN_EVENTS), on_running=lambda: RUN_EVENTS.append("running"))


def test_on_running_is_called_once_at_the_first_result(reference):
    """The hook (the plots' imports start there) comes after the first pass was sent out
    and its first chunk came back, and only once."""
    assert RUN_EVENTS.count("running") == 1
    assert RUN_EVENTS.count("map") > 1 and RUN_EVENTS.count("result") > 2
    assert RUN_EVENTS[: RUN_EVENTS.index("running") + 1] == ["map", "result", "running"]


def assert_same_stats(a, b, rtol: float = RTOL) -> None:
    assert sorted(a.stats) == sorted(b.stats)
    for g in a.stats:
        for name, x in a.stats[g].as_arrays().items():
            y = getattr(b.stats[g], name)
            assert x.shape == y.shape, name
            np.testing.assert_allclose(y, x, rtol=rtol, atol=0, err_msg=f"group {g} {name}")
    for ga, gb in zip(a.groups, b.groups, strict=True):
        np.testing.assert_allclose(gb.mag, ga.mag, rtol=rtol, atol=0)


# ------------------------------------------------------------------------------ shipping
def test_payload_ships_the_reference_once_and_rebuilds_it(inputs):
    ps, refs, opts = inputs
    bands = make_bands(ps, refs[0].nyquist)

    def make_pass(scale=1.0):
        groups = {
            g: GroupPass(ps.mag_matrix(g) * scale, ps.mag_matrix(g), np.ones(b.n_shells + 1))
            for g, b in bands.items()
        }
        return StatisticsPass(ps, refs, ImageSource(ps), bands, PassSpec(groups))

    pass_ = make_pass()
    pay = Payload(pass_)
    tokens, new = pay.parts({})
    kinds = {type(load_blob(b, lambda t: None)).__name__ for b in new.values() if not b.deps}
    assert {"MapReference", "ParticleSet"} <= kinds
    # the per-pass pickle holds no map and no table: small next to the reference
    ref_bytes = sum(len(b.data) for b in new.values())
    assert len(pay.blob.data) < 0.2 * ref_bytes
    # parts already shipped are not pickled again
    again, new2 = Payload(pass_).parts({t: new[t].deps for t in new})
    assert sorted(again) == sorted(tokens) and new2 == {}
    # same content -> same fingerprint; a new M -> another one
    assert Payload(make_pass()).token == pay.token
    assert Payload(make_pass(1.001)).token != pay.token
    # the rebuilt reference evaluates exactly as the original
    cache: dict = {}

    def resolve(tok):
        if tok not in cache:
            cache[tok] = load_blob(new[tok], resolve)
        return cache[tok]

    shipped = load_blob(pay.blob, resolve)
    k3 = np.random.default_rng(0).uniform(-0.1, 0.1, (500, 3))
    v0, g0 = refs[0].evaluate(k3, gradient=True)
    v1, g1 = shipped.refs[0].evaluate(k3, gradient=True)
    assert np.array_equal(v0, v1) and np.array_equal(g0, g1)
    assert shipped.ps is shipped.images.ps  # one table per worker, not two


def test_spectra_read_in_blocks_equal_the_whole_chunks(inputs, monkeypatch):
    """A chunk's images are read and transformed a few at a time
    (``passes.SPECTRA_BLOCK_BYTES``: no chunk-sized image arrays in the workers): every
    spectrum is bit for bit the centred transform of the chunk's images taken at once."""
    import cryomag.fit.passes as passes
    from cryomag.physics.fourier import centered_rfft2

    ps, refs, _ = inputs
    bands = make_bands(ps, refs[0].nyquist)
    groups = {
        g: GroupPass(ps.mag_matrix(g), ps.mag_matrix(g), np.ones(b.n_shells + 1))
        for g, b in bands.items()
    }
    sp = StatisticsPass(ps, refs, ImageSource(ps), bands, PassSpec(groups))
    rows = ps.group_rows(min(bands))[:23]
    whole = centered_rfft2(ImageSource(ps).read(rows))
    box = whole.shape[-2]
    for per_block in (1, 5, 22, 23, 64):
        monkeypatch.setattr(passes, "SPECTRA_BLOCK_BYTES", per_block * 4 * box * box)
        got = sp.spectra(rows)
        assert got.dtype == whole.dtype and got.shape == whole.shape
        assert np.array_equal(got.view(np.uint32), whole.view(np.uint32)), per_block
    one = sp.spectra(rows[:1])
    assert one.shape == (1, box, box // 2 + 1) and np.array_equal(one[0], whole[0])


def test_executor_config_validation_and_factory():
    assert isinstance(make_executor(ExecutorConfig(j=1)), LocalExecutor)
    ex = make_executor(ExecutorConfig(j=2))
    local = ProcessExecutor if fork_available() else DaskExecutor
    assert isinstance(ex, local) and "2 processes" in ex.describe()
    ex.close()  # never started: nothing to stop
    assert "2 processes x 1 threads" in DaskExecutor.local(2).describe()
    ex = make_executor(ExecutorConfig(cluster="slurm", jobs=3, cores=4))
    assert "SLURM (3 job(s) x 4 workers)" in ex.describe()
    with pytest.raises(ValueError, match="slurm or pbs"):
        ExecutorConfig(cluster="sge")
    with pytest.raises(ValueError, match="not both"):
        ExecutorConfig(cluster="slurm", scheduler="tcp://x:8786")
    with pytest.raises(ValueError, match="processes"):
        ExecutorConfig(cores=2, processes=3)


def test_chunks_are_balanced_for_one_two_or_four_workers():
    """Equal chunks, their number a multiple of 4 (else 2) while chunks keep >= 128
    particles, within the chunk size, every particle once, in order, per optics group."""
    def sizes(n, size, groups=1):
        labels = np.repeat(np.arange(groups), n)
        chunks = make_chunks(labels, size)
        rows = np.concatenate([c.rows for c in chunks])
        assert np.array_equal(rows, np.arange(n * groups))
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert all(len(set(labels[list(c.rows)])) == 1 for c in chunks)
        return [len(c) for c in chunks]

    assert sizes(5000, 1024) == [625] * 8  # 4 rounds of 625 on 2 workers, not 3 of 1,000
    assert sizes(20000, 1024) == [1000] * 20
    assert sizes(800, 1024) == [200] * 4  # small sets keep both workers busy
    assert sizes(500, 250) == [250] * 2  # 4 chunks would be below 128 particles
    assert sizes(300, 1024) == [150] * 2
    assert sizes(200, 1024) == [200]
    assert sizes(40, 4) == [4] * 10  # tiny chunks as asked
    assert sizes(5000, 1024, groups=2) == [625] * 16
    assert max(sizes(4099, 1024)) <= 1024


# ------------------------------------------------------------------------------ determinism
def test_local_cluster_of_two_processes_equals_the_synchronous_run(inputs, reference):
    """Through a scheduler address (--scheduler), as for a cluster started elsewhere."""
    from distributed import LocalCluster

    seen = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with DaskExecutor.connect(cluster.scheduler_address) as ex:
            res = run(inputs, _Recording(ex, seen))
            # errors in a chunk reach the caller (with the progress bar on)
            chunks = make_chunks(_labels(inputs[0]), 40)
            with pytest.raises(ValueError, match="bad chunk 2"):
                ex.map(_Failing(), chunks, "failing", progress=True)
            assert ex.map(_Rows(), chunks, "rows", progress=True) == [len(c) for c in chunks]
    assert_same_stats(reference, res)
    # every chunk reported once per pass, in whatever order they finished
    n_chunks = len(make_chunks(_labels(inputs[0]), OPTS["chunk_size"]))
    assert len(seen) == OPTS["max_iter"] * n_chunks


class _Failing:
    def __call__(self, chunk):
        if chunk.index == 2:
            raise ValueError(f"bad chunk {chunk.index}")
        return len(chunk)


class _Rows:
    def __call__(self, chunk):
        return len(chunk.rows)


def test_one_and_four_workers_give_identical_statistics(inputs, reference):
    with DaskExecutor.local(1) as ex:
        one = run(inputs, ex)
    with DaskExecutor.local(4) as ex:
        four = run(inputs, ex)
    assert_same_stats(one, four)
    assert_same_stats(reference, four)


class _Recording:
    """An executor wrapper that records the chunks reported through ``on_result``."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def map(self, fn, chunks, description="", progress=True, on_result=None, collect=True):
        def note(chunk, res):
            self.seen.append(chunk.index)
            if on_result is not None:
                on_result(chunk, res)

        return self.inner.map(fn, chunks, description, progress, on_result=note, collect=collect)


class KillOnce:
    """A pass that kills its own worker process on one chunk, the first time only."""

    def __init__(self, fn, marker: str, chunk_index: int) -> None:
        self.fn, self.marker, self.chunk_index = fn, marker, chunk_index

    def __call__(self, chunk):
        if chunk.index == self.chunk_index and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.fn(chunk)


class _Killing:
    def __init__(self, inner, marker):
        self.inner, self.marker = inner, marker

    def map(self, fn, chunks, description="", progress=True, on_result=None, collect=True):
        killer = KillOnce(fn, self.marker, chunks[len(chunks) // 2].index)
        return self.inner.map(killer, chunks, description, False, on_result, collect)


def test_a_worker_killed_mid_run_is_retried_without_loss_or_double_count(
    inputs, reference, tmp_path
):
    marker = tmp_path / "killed"
    with DaskExecutor.local(2) as ex:
        res = run(inputs, _Killing(ex, str(marker)))
    assert marker.exists(), "the worker was not killed"
    assert int(marker.read_text()) != os.getpid()
    assert_same_stats(reference, res)
    for g, st in res.stats.items():
        rows = inputs[0].group_rows(g)
        assert np.array_equal(st.rows, rows)  # each particle exactly once


def _profiler_enabled() -> bool:
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled"))


def test_forked_local_workers_equal_spawned_ones(inputs, reference, tmp_path):
    """Issue 14: started early (``start_in_background``, before the driver's numerical work)
    a LocalCluster's workers are forked from this process (~0.1 s instead of ~0.6 s and no
    second import); they give the numbers of spawned workers and of the synchronous run
    bit for bit, also when one of them dies mid-pass and is replaced (spawned)."""
    import psutil

    me = tuple(psutil.Process().cmdline())
    res = {}
    for fork in (True, False):
        ex = DaskExecutor.local(2, fork=fork)
        try:
            ex.start_in_background()
            pids = ex.client.run(os.getpid).values()
            forked = {tuple(psutil.Process(p).cmdline()) == me for p in pids}
            assert forked == {fork}, forked
            # no statistical profiler in either kind of worker (WORKER_CONFIG)
            assert set(ex.client.run(_profiler_enabled).values()) == {False}
            killing = _Killing(ex, str(tmp_path / "killed")) if fork else ex
            res[fork] = run(inputs, killing)
        finally:
            ex.close()
    assert (tmp_path / "killed").exists(), "the worker was not killed"
    assert_same_stats(res[False], res[True], rtol=0)
    assert_same_stats(reference, res[True])


# --------------------------------------------------------------- local worker processes
def _pid() -> int:
    return os.getpid()


class _KillAlways:
    """A pass that kills its worker on one chunk, every time."""

    def __init__(self, chunk_index: int) -> None:
        self.chunk_index = chunk_index

    def __call__(self, chunk):
        if chunk.index == self.chunk_index:
            os.kill(os.getpid(), signal.SIGKILL)
        return len(chunk)


@pytest.mark.skipif(not fork_available(), reason="workers are forked on Linux only")
def test_local_worker_processes_equal_the_synchronous_run(inputs, reference, tmp_path):
    """Issue 14: the command line's local executor. Started early its workers are forked
    from this process (same command line, no second import); they give the numbers of the
    synchronous run, also when one dies mid-pass (replaced by a spawned one, its chunk rerun,
    each particle counted once) and when a chunk raises (the caller gets the error, of its
    type, and the workers stay usable for the next map)."""
    import psutil

    me = tuple(psutil.Process().cmdline())
    with ProcessExecutor(2) as ex:
        ex.start_in_background()
        pids = ex.run_on_workers(_pid)
        assert len(pids) == 2 and all(k == v for k, v in pids.items())
        assert {tuple(psutil.Process(p).cmdline()) == me for p in pids} == {True}
        assert "2 processes x 1 threads), forked" in ex.describe()
        wrapped = CheckpointExecutor(ex, tmp_path / ".chunks")  # asks the workers, not itself
        assert wrapped.run_on_workers(_pid) == pids
        chunks = make_chunks(_labels(inputs[0]), 40)
        with pytest.raises(ValueError, match="bad chunk 2") as err:
            ex.map(_Failing(), chunks, "failing", progress=True)
        assert any("raised in a worker process" in n for n in err.value.__notes__)
        assert ex.map(_Rows(), chunks, "rows", progress=True) == [len(c) for c in chunks]
        seen = []
        res = run(inputs, _Recording(_Killing(ex, str(tmp_path / "killed")), seen))
        assert (tmp_path / "killed").exists(), "the worker was not killed"
        assert int((tmp_path / "killed").read_text()) in pids
        assert "spawned" in ex.describe()  # the replacement
        workers = [w.proc for w in ex._workers]
    assert not any(p.is_alive() for p in workers)  # close() ended them
    assert_same_stats(reference, res)
    for g, st in res.stats.items():
        assert np.array_equal(st.rows, inputs[0].group_rows(g))  # each particle once
    n_chunks = len(make_chunks(_labels(inputs[0]), OPTS["chunk_size"]))
    assert len(seen) == OPTS["max_iter"] * n_chunks  # each chunk reported once per pass


def test_spawned_worker_processes_equal_forked_ones(inputs, reference):
    """Workers started by the first map (not early) are spawned: same numbers."""
    with ProcessExecutor(2, fork=False) as ex:
        res = run(inputs, ex)
        assert "spawned" in ex.describe() and "forked" not in ex.describe()
    assert_same_stats(reference, res)


class _Unpicklable(Exception):
    def __init__(self, a, b):  # pickles, but does not unpickle (one argument stored)
        super().__init__(f"{a} and {b}")


class _BadResults:
    """Chunk 0 raises an exception that cannot travel back, chunk 1 returns a result that
    cannot be pickled."""

    def __call__(self, chunk):
        if chunk.index == 0:
            raise _Unpicklable("first", "second")
        return lambda: chunk.index  # a local function: pickle refuses it


def test_errors_that_cannot_travel_still_reach_the_driver():
    """An exception that does not unpickle arrives as a RuntimeError naming its type and
    message (or as itself where tblib, which distributed installs, makes it travel); a
    result that does not pickle as the pickling error; neither hangs the map."""
    chunks = make_chunks(np.zeros(20, int), 10)
    with ProcessExecutor(1) as ex:
        with pytest.raises(Exception, match="first and second") as err:
            ex.map(_BadResults(), chunks[:1], progress=False)
        got = type(err.value).__name__
        assert got == "_Unpicklable" or (got == "RuntimeError" and "_Unpicklable" in str(err.value))
        with pytest.raises(Exception, match="pickle"):
            ex.map(_BadResults(), chunks[1:], progress=False)
        assert ex.map(_Rows(), chunks, progress=False) == [10, 10]


@pytest.mark.skipif(not fork_available(), reason="workers are forked on Linux only")
def test_a_chunk_that_kills_every_worker_fails_the_map_naming_it():
    """No endless retries: after MAX_TRIES runs the map fails with the chunk and how its
    worker ended; the executor stays usable (also when a worker ended between two maps) and
    closes leaving no process."""
    chunks = make_chunks(np.zeros(40, int), 10)
    ex = ProcessExecutor(2)
    try:
        ex.start_in_background()
        with pytest.raises(RuntimeError, match=rf"chunk 1: its worker process ended "
                                               rf"{MAX_TRIES} times \(last: killed by SIGKILL"):
            ex.map(_KillAlways(1), chunks, progress=False)
        assert ex.map(_Rows(), chunks, progress=False) == [10] * 4  # replaced, usable
        gone = ex._workers[0].proc
        os.kill(gone.pid, signal.SIGKILL)  # an idle worker ends between two maps
        gone.join(10)
        assert ex.map(_Rows(), chunks, progress=False) == [10] * 4
        assert gone not in [w.proc for w in ex._workers]
        workers = [w.proc for w in ex._workers]
    finally:
        ex.close()
    assert not any(p.is_alive() for p in workers)


# ------------------------------------------------------------------------------ checkpoints
def test_the_map_ships_as_its_float32_volume(inputs):
    """The reference pickles as its real volume in single precision (not its complex
    evaluation buffers, nor the gradient volumes built on a worker), and travels once."""
    import pickle

    _, refs, _ = inputs
    ref = refs[0]
    ref.evaluate(np.zeros((1, 3)), gradient=True)  # builds the gradient stack
    size = len(pickle.dumps(ref, protocol=5))
    assert ref.box**3 * 4 <= size < ref.box**3 * 4 * 1.01 + 4096
    back = pickle.loads(pickle.dumps(ref, protocol=5))
    k3 = np.random.default_rng(1).uniform(-0.1, 0.1, (200, 3))
    assert np.array_equal(back.evaluate(k3), ref.evaluate(k3))


def test_execution_layer_imports_no_domain_module():
    """execution/ knows nothing of cryo-EM: no import of io, model, physics, fit, ..."""
    import ast

    pkg = REPO / "src" / "cryomag" / "execution"
    allowed = ("cryomag.execution", "cryomag._files", "cryomag._plain")
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("cryomag"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"


def test_checkpoint_executor_resumes_and_rejects_other_inputs(inputs, reference, tmp_path):
    folder = tmp_path / ".chunks"
    first = CheckpointExecutor(LocalExecutor(), folder)
    assert_same_stats(reference, run(inputs, first))
    assert all(c["read"] == 0 for c in first.counts)
    state = json.loads((folder / "state.json").read_text())
    assert [p["complete"] for p in state["passes"]] == [True, True]
    assert len(state["passes"][1]["M"]) == inputs[0].n_groups
    n_chunks = len(make_chunks(_labels(inputs[0]), OPTS["chunk_size"]))
    assert len(list(folder.glob("pass_*/chunk_*.npz"))) == 2 * n_chunks
    # drop pass 2 as if the run had been killed at its start
    state["passes"][1]["complete"] = False
    (folder / "state.json").write_text(json.dumps(state))
    for f in (folder / "pass_002").glob("chunk_*.npz"):
        f.unlink()
    ps, refs, opts = inputs
    # chunk results of pass 2 for the first 5 chunks, written by a partial run
    again = CheckpointExecutor(LocalExecutor(), folder, resume=True)
    _partial(again, inputs, stop_after=5)
    resumed = CheckpointExecutor(LocalExecutor(), folder, resume=True)
    res = run(inputs, resumed)
    assert resumed.counts[0] == {"pass": 1, "read": n_chunks, "computed": 0}
    assert resumed.counts[1]["read"] >= 5
    assert resumed.counts[1]["read"] + resumed.counts[1]["computed"] == n_chunks
    assert_same_stats(reference, res)
    # other options -> other fingerprints: nothing is reused
    other = CheckpointExecutor(LocalExecutor(), folder, resume=True)
    run((ps, refs, EstimateOptions(**{**OPTS, "low_res_A": 25.0})), other)
    assert all(c["read"] == 0 for c in other.counts)
    other.finish()
    assert not folder.exists()


class _Stop(Exception):
    pass


def _partial(ex: CheckpointExecutor, inputs, stop_after: int) -> None:
    """Run until ``stop_after`` chunks of pass 2 are stored, then stop as if killed."""
    count = {"n": 0}
    inner = ex.inner

    class Stopping(LocalExecutor):
        def map(self, fn, chunks, description="", progress=True, on_result=None, collect=True):
            if ex._pass < 2:
                return inner.map(fn, chunks, description, progress, on_result, collect)

            def store(c, r):
                on_result(c, r)
                count["n"] += 1
                if count["n"] >= stop_after:
                    raise _Stop

            return inner.map(fn, chunks, description, progress, on_result=store, collect=collect)

    ex.inner = Stopping()
    with pytest.raises(_Stop):
        run(inputs, ex)


# ------------------------------------------------------------------------------ CLI runs
def _cli(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cryomag.cli.main",
        "estimate",
        "-i",
        str(data / "particles.star"),
        "--ref",
        str(data / "ref.mrc"),
        "-o",
        str(out),
        "--fit",
        "scale,aniso",
        "--max-iter",
        "3",
        "--tol",
        "0",
        "--chunk-size",
        "4",
        "--no-plots",
        "-q",
        *extra,
    ]


def _wait_for_chunks(proc, folder: Path, pass_no: int, n: int, timeout: float = 120) -> None:
    t0 = time.monotonic()
    pdir = folder / f"pass_{pass_no:03d}"
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()}")
        if len(list(pdir.glob("chunk_*.npz"))) >= n:
            return
        time.sleep(0.005)
    pytest.fail("no chunk files appeared")


def _compare_outputs(out: Path, expected) -> None:
    got = json.loads((out / "results.json").read_text())
    for gr, g in zip(expected.groups, got["groups"], strict=True):
        np.testing.assert_allclose(g["M"], gr.mag, rtol=RTOL, atol=0)
    for gr in expected.groups:
        with np.load(out / "stats" / f"group_{gr.group:03d}.npz") as z:
            st = expected.stats[gr.group]
            for name, x in st.as_arrays().items():
                np.testing.assert_allclose(z[name], x, rtol=RTOL, atol=0, err_msg=name)
    assert not (out / ".chunks").exists()


@pytest.fixture(scope="module")
def cli_reference(data):
    return estimate(
        data / "particles.star",
        data / "ref.mrc",
        None,
        progress=False,
        **{**OPTS, "max_iter": 3, "chunk_size": 4},
    )


def test_killed_run_resumes_with_only_the_unfinished_chunks(data, tmp_path, cli_reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(data, out, "--j", "1", "--threads", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_chunks(proc, out / ".chunks", 2, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # the pass in progress when the run died, and its finished chunks
    current = max(int(d.name[5:]) for d in (out / ".chunks").glob("pass_*"))
    pdir = out / ".chunks" / f"pass_{current:03d}"
    state = json.loads((out / ".chunks" / "state.json").read_text())
    complete = state["passes"][-1]["pass"] == current and state["passes"][-1]["complete"]
    stored = 0 if complete else len(list(pdir.glob("chunk_*.npz")))
    assert current >= 2 and state["passes"][0]["complete"]
    done = subprocess.run(
        _cli(data, out, "--j", "1", "--threads", "1", "--resume"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    log = (out / "cryomag.log").read_text()
    n_chunks = len(make_chunks(_labels(read_particles(data / "particles.star")), 4))
    for k in range(1, current + 1 if complete else current):
        assert f"pass {k}: all {n_chunks} chunks read" in log
    if stored:
        assert f"pass {current}: {stored} of {n_chunks} chunks read" in log
        assert f"computing {n_chunks - stored}" in log
    _compare_outputs(out, cli_reference)


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action. A test runner started as a background job of
    a non-interactive shell has SIGINT ignored, and a child inherits that (Python then never
    raises KeyboardInterrupt): the run would finish as if no Ctrl-C had come."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_with_local_workers_leaves_a_resumable_state(data, tmp_path, cli_reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(data, out, "--j", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    # interrupt early in the first pass: the rest of the run (two more passes, the outputs)
    # must not have finished before the signal arrives
    _wait_for_chunks(proc, out / ".chunks", 1, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    stored = list((out / ".chunks").rglob("*.npz"))
    assert stored and not list((out / ".chunks").rglob(".*.tmp-*"))
    done = subprocess.run(_cli(data, out, "--j", "2", "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "chunks read from" in (out / "cryomag.log").read_text()
    _compare_outputs(out, cli_reference)
