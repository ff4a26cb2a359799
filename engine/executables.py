"""Compiled step executables: compiled ahead of time, one per argument shape, and kept on disk.

Data flow. The runner makes each of its jitted functions an `AotFunction`. Warm-up calls
`prepare(*args)` for every shape the bucket plan lists (arguments may be `jax.ShapeDtypeStruct`s, so
nothing runs); a step calls the function, which looks its arguments' shapes up and calls the ready
executable. A shape never prepared is compiled at its first call, as `jax.jit` does.

    prepare(args) -> signature (tree structure, leaf shapes and dtypes)
        -> the table in memory                                       (ready)
        -> ExecutableCache.load(key)   a serialized executable       (no tracing, no XLA compile)
        -> jit.lower(args).compile()   tracing, lowering, XLA (or JAX's own persistent cache)
           -> ExecutableCache.store(key)

JAX's persistent compilation cache keys an executable by its lowered module, so every start still
traces and lowers every shape; this cache keys it by what determines the module without tracing: the
function and its static arguments, the argument shapes, the kvloom source the runner runs
(engine.source_digest), the JAX and XLA versions and options, the devices and the host CPU. Any change
among them is a miss, never a stale executable. Entries are written atomically; an unreadable one is
compiled again.

An executable that JAX read back from its own persistent cache cannot be serialized again (XLA:CPU
loses its kernels), so with a cache each program's name carries the source digest, the cache
directory's own random salt and its signature: new code, or a new cache directory, is new to JAX's
cache too, and two signatures that lower alike never meet there, and XLA compiles each. An executable
that came from JAX's cache anyway (its monitoring event says so) is used but not kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax

from kvloom.engine.source_digest import source_digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNUSED_DAYS = 30  # an entry not loaded for this long is deleted (older code, configurations gone)
RUNNER_MODULE = "kvloom.engine.runner"  # its source and every kvloom module it imports key the executables
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# JAX options that change nothing in a compiled executable (where caches live, logging)
_NEUTRAL_OPTIONS = ("jax_compilation_cache", "jax_persistent_cache", "jax_enable_compilation_cache",
                    "jax_explain_cache_misses", "jax_log_compiles", "jax_logging_level",
                    "jax_debug_log_modules", "jax_raise_persistent_cache_errors")


def _host_cpu() -> str:
    """The CPU model and feature flags: an executable compiled for one host CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


class ExecutableCache:
    """Serialized executables in `directory`, one file per key."""

    def __init__(self, directory: str, devices):
        self.directory = directory
        self.code_digest = source_digest([RUNNER_MODULE])
        self.fingerprint = self._environment(devices)
        self.salt = self._salt()
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - UNUSED_DAYS * 86400
        try:
            for entry in os.scandir(self.directory):
                if entry.name.endswith(".exe") and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
        except OSError:
            pass  # another process pruned it first, or the directory is not ours to change

    def _salt(self) -> str:
        """The directory's random salt, made with it: part of every function's name (see above)."""
        path = os.path.join(self.directory, "salt")
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            pass
        salt = os.urandom(8).hex()
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".salt.", dir=self.directory)
            with os.fdopen(fd, "w") as f:
                f.write(salt)
            try:
                os.link(tmp, path)  # the first writer wins; the others read its salt
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            log.warning("the start cache %s is unusable: %s", self.directory, exc)
            return salt

    def _environment(self, devices) -> str:
        """What every executable of this process depends on besides its function and argument shapes."""
        import jaxlib

        options = sorted((k, repr(v)) for k, v in jax.config.values.items()
                         if not k.startswith(_NEUTRAL_OPTIONS))
        backend = devices[0].client
        parts = (FORMAT_VERSION, self.code_digest, jax.__version__, jaxlib.__version__, backend.platform,
                 backend.platform_version, [(d.id, d.process_index, d.device_kind) for d in devices],
                 jax.process_count(), os.environ.get("XLA_FLAGS", ""), options, _host_cpu())
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def _path(self, identity: str, signature) -> str:
        key = hashlib.sha256(repr((self.fingerprint, identity, signature)).encode()).hexdigest()
        return os.path.join(self.directory, f"{key}.exe")

    def load(self, identity: str, signature):
        """The executable stored for (identity, signature), or None."""
        from jax.experimental import serialize_executable

        path = self._path(identity, signature)
        try:
            with open(path, "rb") as f:
                stored_identity, stored_signature, blob, in_tree, out_tree = pickle.load(f)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - truncated or from another version: compile instead
            log.warning("ignoring an unreadable compiled executable %s: %s", path, exc)
            return None
        if stored_identity != identity or stored_signature != signature:
            return None
        try:
            executable = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
            os.utime(path)  # used: kept by _prune
            return executable
        except Exception as exc:  # noqa: BLE001
            log.warning("ignoring a compiled executable that does not load %s: %s", path, exc)
            return None

    def store(self, identity: str, signature, compiled) -> None:
        """Write atomically (a temporary file renamed into place); failing to store never fails a start."""
        from jax.experimental import serialize_executable

        path, tmp = self._path(identity, signature), None
        try:
            blob, in_tree, out_tree = serialize_executable.serialize(compiled)
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".exe.", dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                pickle.dump((identity, signature, blob, in_tree, out_tree), f,
                            protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
            tmp = None
        except Exception as exc:  # noqa: BLE001 - e.g. a read-only directory, an executable that cannot serialize
            log.warning("could not store a compiled executable in %s: %s", self.directory, exc)
        finally:
            if tmp is not None:
                os.unlink(tmp)


def signature(args) -> tuple:
    """What selects an executable: the arguments' tree structure and each leaf's shape and dtype."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return str(tree), tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)


@dataclass
class CompileStats:
    """Where the executables of a runner came from, and the seconds spent on each kind (summed over
    the threads that prepared them, so they may exceed the wall time)."""

    loaded: int = 0
    compiled: int = 0
    load_s: float = 0.0
    lower_s: float = 0.0
    compile_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict:
        return dict(executables_loaded=self.loaded, executables_compiled=self.compiled,
                    load_s=round(self.load_s, 3), lower_s=round(self.lower_s, 3),
                    compile_s=round(self.compile_s, 3))


def _named(fn: Callable, name: str) -> Callable:
    def call(*args):
        return fn(*args)

    call.__name__ = call.__qualname__ = name  # jax names the jitted module after it
    return call


class AotFunction:
    """`jax.jit(fn, **jit_options)` called through executables compiled ahead of time, one per argument
    signature. `identity` names the function and its static arguments (part of the on-disk key)."""

    def __init__(self, name: str, fn: Callable, jit_options: dict, identity: str,
                 cache: Optional[ExecutableCache], stats: CompileStats):
        self._jitted = jax.jit(fn, **jit_options)
        self._fn, self._name, self._jit_options = fn, name, jit_options
        self.identity, self._cache, self._stats = f"{name} {identity}", cache, stats
        self._table: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._pending: dict[tuple, threading.Event] = {}

    def __call__(self, *args):
        executable = self._table.get(signature(args))
        if executable is None:
            executable = self.prepare(*args)
        return executable(*args)

    def _cache_size(self) -> int:
        return len(self._table)

    def lower(self, *args):
        """The jitted function's own lowering (tests read the compiled HLO)."""
        return self._jitted.lower(*args)

    def prepare(self, *args):
        """The executable for these arguments (arrays or `jax.ShapeDtypeStruct`s): from memory, from the
        on-disk cache, or compiled now. Thread-safe: one signature is prepared once."""
        key = signature(args)
        while True:
            with self._lock:
                if key in self._table:
                    return self._table[key]
                event = self._pending.get(key)
                if event is None:
                    self._pending[key] = event = threading.Event()
                    break
            event.wait()  # another thread prepares it
        try:
            executable = self._load_or_compile(key, args)
            with self._lock:
                self._table[key] = executable
            return executable
        finally:
            with self._lock:
                del self._pending[key]
            event.set()

    def _load_or_compile(self, key, args):
        if self._cache is not None:
            t0 = time.perf_counter()
            executable = self._cache.load(self.identity, key)
            if executable is not None:
                self._stats.add(loaded=1, load_s=time.perf_counter() - t0)
                return executable
        t0 = time.perf_counter()
        jitted = self._jitted
        if self._cache is not None:
            # Named for this signature too: two signatures whose programs lower alike (an argument the
            # function does not read is pruned) must not meet in JAX's cache, or the second cannot be kept.
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            name = f"{self._name}_{self._cache.code_digest[:12]}_{self._cache.salt}_{digest}"
            jitted = jax.jit(_named(self._fn, name), **self._jit_options)
        lowered = jitted.lower(*args)
        t1 = time.perf_counter()
        thread, hits = threading.get_ident(), []

        def on_event(event: str, **_) -> None:
            if event == _CACHE_HIT_EVENT and threading.get_ident() == thread:
                hits.append(event)

        jax.monitoring.register_event_listener(on_event)
        try:
            executable = lowered.compile()
        finally:
            jax.monitoring.unregister_event_listener(on_event)
        self._stats.add(compiled=1, lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
        if self._cache is not None and not hits:  # one from JAX's cache would not run once stored
            self._cache.store(self.identity, key, executable)
        return executable
