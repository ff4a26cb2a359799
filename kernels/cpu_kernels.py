"""A decode step's matmuls, and every step's attention, on a CPU as native kernels (`cpu_linear.cc`,
`cpu_attention.cc`, `cpu_extend_attention.cc`), called from the compiled step through XLA's FFI.

    load(build_dir)  -> a CpuKernels, or None with the reason logged (not x86-64 Linux with AVX-512, no
                        C++ compiler, a failed build)
        the sources are compiled once per machine (in parallel, then linked) into one library,
        build_dir/cpu_kernels-<digest>.so (the digest: the sources and headers, the compiler flags, jaxlib's
        version), loaded, and its handlers registered with XLA under names that carry the digest
    kernels.linear(x, w)
                     -> x [T, K] float32 times w [N, K] (float32, float16, or bfloat16 where the CPU
                        has AVX512-BF16) -> [T, N] float32, for T <= MAX_ROWS (`handles`)
    kernels.decode_attention(q, k_own, v_own, new_lens, k_cache, v_cache, page_table, past_lens, layer)
                     -> what kernels.attention's decode path computes, for a float32, float16 or
                        bfloat16 cache
                        and a head size of 16, 32, 64 or 128 (`handles_attention`)
    kernels.extend_attention(q, k_new, v_new, new_lens, segment_ids, k_cache, ..., layer)
                     -> what kernels.attention's blocked path computes for several new tokens per row
                        (prefill chunks, scoring's packed items, verify steps), same conditions

Why the matmuls: XLA's CPU dot packs the weight on every call, which for a decode step's few rows costs
more than the product, and a one-row bfloat16 product takes a slow path. `python -m
kvloom.tools.bench_linear` (one pass over the default model's 30 layers of weights and its LM head, 2
cores, AVX-512 with BF16; ms per pass, kernel against XLA's dot, over several runs): 1 row, bfloat16 11-14
against 28-29, float32 17-26 against 20-23 (both near the memory's bandwidth); 8 rows, bfloat16 10-13
against 27-31, float32 19-20 against 29-40; 32 rows, bfloat16 27-32 against 40-51, float32 48-64 against
60-70.

Why the attention: XLA walks the past in blocks of gathered pages, a while loop of small ops per layer;
the kernel reads each key and value once from its page. 30 layers of the default model's heads (9 query,
3 KV, 64 wide), float32 cache, ms per step: 1 row of 64 past tokens 1.18 against 0.26; 8 rows of 64 7.39
against 1.44; 8 of 512 54.4 against 14.2; 32 of 96 32.2 against 12.5 (bfloat16 cache: 1.25/0.24,
4.83/1.18, 28.4/9.7, 18.4/9.7). For longer steps XLA's blocked walk materialises scores, masks and
probabilities block by block; the extend kernel keeps a block of 48 query rows' scores and accumulators
in cache and register tiles: a packed score step of the default model (512 item tokens against a
2,000-token query, 30 layers, float32) 593 ms against 425 ms (168 GFLOP/s).

XLA keeps one registry of FFI targets per process, so a loaded library is kept per digest for the process
(`_LOADED`): engines built later, or side by side, reuse its registration.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

MAX_ROWS = 32  # the most rows of x the kernel is used for (a decode step); longer steps use XLA's dot
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name)
                for name in ("cpu_linear.cc", "cpu_attention.cc", "cpu_extend_attention.cc"))
HEADERS = tuple(os.path.join(_HERE, name) for name in ("cpu_parallel.h", "cpu_simd.h"))
ATTENTION_HEAD_SIZES = (16, 32, 64, 128)
ATTENTION_MAX_GROUP = 16  # query heads per KV head
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mfma")
_TARGET_PREFIX = "kvloom_cpu"
_LINEAR_KINDS = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.float16): "f16",
                 jnp.dtype(jnp.bfloat16): "bf16"}  # weight dtype -> the linear handler's suffix

_LOADED: dict[str, "CpuKernels"] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class CpuKernels:
    """The registered kernels: `digest` names this build (it goes into the executable cache's key),
    `bfloat16` whether bfloat16 weights are handled (the CPU has AVX512-BF16)."""
    digest: str
    bfloat16: bool

    def _target(self, name: str) -> str:
        return f"{_TARGET_PREFIX}_{name}_{self.digest}"

    def handles(self, rows: int, dtype) -> bool:
        """Whether `linear` takes a product of `rows` rows with a weight of `dtype`."""
        dtype = jnp.dtype(dtype)
        return rows <= MAX_ROWS and (dtype in (jnp.float32, jnp.float16)
                                     or (self.bfloat16 and dtype == jnp.bfloat16))

    def linear(self, x, w):
        """x [T, K] (any float; read as float32) times w [N, K] -> [T, N] float32 (bfloat16 weights
        multiply x rounded to bfloat16; float16 weights are widened, x kept float32)."""
        kind = _LINEAR_KINDS[jnp.dtype(w.dtype)]
        out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
        return jax.ffi.ffi_call(self._target(f"linear_{kind}"), out)(x.astype(jnp.float32), w)

    @staticmethod
    def handles_attention(head_size: int, group: int, storage) -> bool:
        """Whether `decode_attention` and `extend_attention` take heads of head_size, `group` query heads
        per KV head, over a cache of storage dtype `storage` (kernels.kv_format: float32, or uint16 for
        bfloat16)."""
        return (head_size in ATTENTION_HEAD_SIZES and 1 <= group <= ATTENTION_MAX_GROUP
                and jnp.dtype(storage) in (jnp.float32, jnp.float16, jnp.uint16))

    def decode_attention(self, q, k_own, v_own, new_lens, k_cache, v_cache, page_table, past_lens, layer):
        """q [B, H, D] float32 (scaled), k_own/v_own [B, KVH, D] float32, the cache [L, P, S, KVH, D] in
        its storage dtype, layer an int32 scalar -> [B, H, D] float32 (zeros for rows with new_lens 0)."""
        out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
        return jax.ffi.ffi_call(self._target("decode_attention"), out)(
            q, k_own, v_own, new_lens, k_cache, v_cache, page_table, past_lens,
            jnp.asarray(layer, jnp.int32).reshape(()))

    def extend_attention(self, q, k_new, v_new, new_lens, segment_ids, k_cache, v_cache, page_table,
                         past_lens, layer):
        """q [B, Q, H, D] float32 (scaled), k_new/v_new [B, Q, KVH, D] float32, segment_ids [B, Q] int32
        (contiguous runs; all zeros: one causal extension), the cache [L, P, S, KVH, D] in its storage dtype,
        layer an int32 scalar -> [B, Q, H, D] float32 (zeros at tokens past new_lens)."""
        out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
        return jax.ffi.ffi_call(self._target("extend_attention"), out)(
            q, k_new, v_new, new_lens, segment_ids, k_cache, v_cache, page_table, past_lens,
            jnp.asarray(layer, jnp.int32).reshape(()))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> Optional[str]:
    """The C++ compiler: $CXX, else g++ or c++ on the PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def source_digest(cxx: str) -> str:
    import jaxlib
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join((cxx, *FLAGS, jaxlib.__version__)).encode())
    return digest.hexdigest()[:16]


def unavailable_reason() -> Optional[str]:
    """Why the kernel cannot be used on this machine, or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    missing = {"avx512f", "avx512bw", "avx512vl"} - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if compiler() is None:
        return "no C++ compiler (set CXX, or install g++)"
    return None


def build(build_dir: str, cxx: str, digest: str) -> str:
    """The shared library for this digest in build_dir, compiled unless already there: each source to an
    object file at once (one compiler process per source), then linked; written under a temporary name and
    renamed, so concurrent builds of the same digest are harmless."""
    path = os.path.join(build_dir, f"cpu_kernels-{digest}.so")
    if os.path.exists(path):
        return path
    os.makedirs(build_dir, exist_ok=True)
    log.info("building the CPU kernels (once per machine) into %s", path)
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".build-") as work:
        objects = [os.path.join(work, os.path.basename(source) + ".o") for source in SOURCES]
        compiles = [[cxx, *FLAGS, "-c", f"-I{jax.ffi.include_dir()}", source, "-o", obj]
                    for source, obj in zip(SOURCES, objects)]
        running = [(command, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              text=True)) for command in compiles]
        tmp = os.path.join(work, "cpu_kernels.so")
        steps = [(command, process.communicate()[1], process.returncode) for command, process in running]
        if all(code == 0 for _, _, code in steps):
            link = [cxx, *FLAGS, *objects, "-o", tmp]
            done = subprocess.run(link, capture_output=True, text=True)
            steps.append((link, done.stderr, done.returncode))
        for command, stderr, code in steps:
            if code != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
        os.replace(tmp, path)
    return path


def load(build_dir: str) -> Optional[CpuKernels]:
    """The kernel, built into build_dir if need be and registered with XLA; None (and why, logged) where
    it cannot be."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("CPU kernels not used: %s", reason)
        return None
    cxx = compiler()
    digest = source_digest(cxx)
    with _LOCK:
        if digest not in _LOADED:
            import ctypes
            try:
                library = ctypes.cdll.LoadLibrary(build(build_dir, cxx, digest))
            except (OSError, RuntimeError) as e:
                log.warning("CPU kernels not used: %s", e)
                return None
            handlers = dict(linear_f32=library.KvloomLinearF32, linear_f16=library.KvloomLinearF16,
                            linear_bf16=library.KvloomLinearBF16,
                            decode_attention=library.KvloomDecodeAttention,
                            extend_attention=library.KvloomExtendAttention)
            for name, handler in handlers.items():
                jax.ffi.register_ffi_target(f"{_TARGET_PREFIX}_{name}_{digest}", jax.ffi.pycapsule(handler),
                                            platform="cpu")
            _LOADED[digest] = CpuKernels(digest, bfloat16="avx512_bf16" in cpu_flags())
        return _LOADED[digest]
