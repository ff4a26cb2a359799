"""engine.executables: executables compiled ahead of time, kept on disk by what determines them, read back
without tracing; and engine.source_digest, the code they are keyed by."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvloom.engine.executables import AotFunction, CompileStats, ExecutableCache
from kvloom.engine.source_digest import source_files

pytestmark = pytest.mark.timeout(120)


def scores(x, w):
    # iota and a sort: kernels that an executable read back from JAX's own cache loses when re-serialized
    return jnp.argsort(x @ w + jnp.arange(w.shape[1], dtype=x.dtype)), (x @ w).sum()


def make(directory, identity="scores test", stats=None):
    cache = ExecutableCache(str(directory), jax.devices())
    return AotFunction("scores", scores, {}, identity, cache, stats or CompileStats()), cache


def entries(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".exe"))


def test_compiled_once_then_read_back_by_a_new_process_view(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    w = np.cos(np.arange(20, dtype=np.float32)).reshape(4, 5)
    first_stats = CompileStats()
    first, _ = make(tmp_path, stats=first_stats)
    want = jax.tree.map(np.asarray, first(x, w))
    assert (first_stats.compiled, first_stats.loaded) == (1, 0) and len(entries(tmp_path)) == 1

    stats = CompileStats()
    again, _ = make(tmp_path, stats=stats)  # what a second start sees: a new function, the same directory
    got = again(x, w)
    assert (stats.compiled, stats.loaded) == (0, 1)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])

    again(x + 1, w)  # the same shapes: the same executable
    assert again._cache_size() == 1 and (stats.compiled, stats.loaded) == (0, 1)
    again(x[:2], w)  # another shape: another executable
    assert again._cache_size() == 2 and stats.compiled == 1

    other_stats = CompileStats()
    other, _ = make(tmp_path, identity="scores other static arguments", stats=other_stats)
    other(x, w)  # another identity: never another function's executable
    assert (other_stats.compiled, other_stats.loaded) == (1, 0)


def test_prepared_from_shapes_alone_then_called_with_arrays(tmp_path):
    stats = CompileStats()
    fn, _ = make(tmp_path, stats=stats)
    x, w = np.ones((3, 4), np.float32), np.ones((4, 5), np.float32)
    fn.prepare(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
    assert fn._cache_size() == 1
    fn(x, w)
    assert fn._cache_size() == 1 and stats.compiled == 1


def test_an_unreadable_entry_is_compiled_again(tmp_path, caplog):
    x, w = np.ones((2, 4), np.float32), np.ones((4, 5), np.float32)
    make(tmp_path)[0](x, w)
    [name] = entries(tmp_path)
    with open(tmp_path / name, "r+b") as f:
        f.truncate(50)
    stats = CompileStats()
    with caplog.at_level(logging.WARNING):
        fn, _ = make(tmp_path, stats=stats)
        got = fn(x, w)
    assert stats.compiled == 1 and "ignoring an unreadable compiled executable" in caplog.text
    np.testing.assert_array_equal(np.asarray(got[1]), np.float32(40))


def test_an_executable_from_jax_s_own_cache_is_used_but_not_kept(tmp_path):
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("JAX's persistent compilation cache is off in this process")
    x, w = np.ones((2, 4), np.float32), np.ones((4, 5), np.float32)
    make(tmp_path)[0](x, w)  # XLA compiled it: kept here, and in JAX's cache under the same name
    for name in entries(tmp_path):
        os.unlink(tmp_path / name)
    stats = CompileStats()
    fn, _ = make(tmp_path, stats=stats)
    got = fn(x, w)  # JAX's cache has it: it runs, but could not run once serialized again
    assert stats.compiled == 1 and entries(tmp_path) == []
    np.testing.assert_array_equal(np.asarray(got[1]), np.float32(40))


def test_a_new_directory_gets_a_new_salt(tmp_path):
    a, b = make(tmp_path / "a")[1], make(tmp_path / "b")[1]
    assert a.salt != b.salt and make(tmp_path / "a")[1].salt == a.salt
    assert a.code_digest == b.code_digest and a.fingerprint == b.fingerprint


def test_the_runner_s_code_is_what_its_executables_depend_on():
    files = {os.path.relpath(f, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
             for f in source_files(["kvloom.engine.runner"])}
    assert {"engine/runner.py", "engine/models/llama.py", "kernels/attention.py", "engine/sampling.py",
            "engine/prompt_logprobs.py", "engine/request.py"} <= files
    assert not files & {"engine/scheduler.py", "engine/engine.py", "engine/tokenizer.py", "api/server.py"}


def test_the_digest_is_read_while_other_threads_parse_python():
    """The digest is computed on the compute thread while other threads may run `ast.parse`, which in
    CPython 3.11 is not safe to run on two threads at once; the digest does not parse, so it is stable."""
    import ast
    import threading

    from kvloom.engine.source_digest import source_digest

    expected, stop, results = source_digest(["kvloom.engine.runner"]), threading.Event(), []
    source = open(source_files(["kvloom.engine.runner"])[0]).read()

    def parse():
        while not stop.is_set():
            ast.parse(source)

    parser = threading.Thread(target=parse)
    parser.start()
    try:
        results = [source_digest(["kvloom.engine.runner"]) for _ in range(20)]
    finally:
        stop.set()
        parser.join(30)
    assert results == [expected] * 20 and not parser.is_alive()
