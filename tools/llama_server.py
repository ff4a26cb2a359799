"""llama.cpp's own C++ `llama-server` (parallel slots, continuous batching), the serving peer of
`kvloom compare`: built once on request, found in the cache, run on a free loopback port.

    kvloom build-llama-server [--version V] [--sdist FILE] [--jobs N] [--force]
        (flags declared in tools.command_args)

Build (only on request; never by `kvloom compare` itself):
    the llama-cpp-python sdist (`pip download --no-binary :all:`, or --sdist FILE)
      -> its vendored llama.cpp (vendor/llama.cpp) extracted into a scratch folder in the cache
      -> CMake configure (CMAKE_OPTIONS: Release, native CPU, static, no UI assets, no network)
      -> `cmake --build --target llama-server -j N`, its output in build.log, progress on stderr
      -> the one binary moved into place atomically: binary_path(version); the scratch folder removed
    The cache: cache_root() (the engine's, $KVLOOM_CACHE_DIR or ~/.cache/kvloom) / llama.cpp / VERSION.

Run:
    find_binary(explicit) -> a given path, else the cached build of DEFAULT_VERSION, else None
        (missing_message: the one line that names the command that builds it)
    server_command(...) -> argv: --parallel slots, --ctx-size slots x per-slot context, threads
    running_server(...) async context: started with its log in a temp file, /health polled until 200
        (deadline; an exit ends the wait at once), yields the base URL; stopped by its own PID
        (SIGTERM, SIGKILL after a grace period); on any failure the log's tail goes to stderr
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional, Sequence

from kvloom.engine.config import cache_root
from kvloom.tools.command_args import LLAMA_SERVER_VERSION as DEFAULT_VERSION

BUILD_COMMAND = "kvloom build-llama-server"
TARGET = "llama-server"
VENDORED = "vendor/llama.cpp"
# Release, tuned for this CPU, one static binary; no web UI (its assets would be downloaded), no
# HTTPS or curl, no tests or examples.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_CURL=OFF")
HEALTH_POLL_S = 0.25  # between /health polls; a server that exits ends the wait at once
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20


class BuildError(Exception):
    """The build failed; the message names the step and where its output is."""


class LlamaServerError(Exception):
    """The server did not come up; the message says why in one line."""


def say(message: str) -> None:
    print(f"kvloom: {message}", file=sys.stderr, flush=True)


# ---- where it lives ------------------------------------------------------------------------------

def server_dir(version: str = DEFAULT_VERSION) -> str:
    return os.path.join(cache_root(), "llama.cpp", version)


def binary_path(version: str = DEFAULT_VERSION) -> str:
    return os.path.join(server_dir(version), TARGET)


def is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def missing_message(version: str = DEFAULT_VERSION) -> str:
    return (f"llama-server is not built: `{BUILD_COMMAND}` builds it once (llama.cpp of llama-cpp-python "
            f"{version}, into {server_dir(version)}; takes minutes)")


def find_binary(explicit: Optional[str] = None) -> Optional[str]:
    """The llama-server to run: `explicit` (ValueError unless executable), else the cached build of
    DEFAULT_VERSION, else None."""
    if explicit:
        path = os.path.expanduser(explicit)
        if not is_executable(path):
            raise ValueError(f"--llama-server {explicit}: not an executable file")
        return path
    path = binary_path()
    return path if is_executable(path) else None


# ---- the build -----------------------------------------------------------------------------------

def download_command(version: str, directory: str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={version}", "-d", directory]


def configure_command(source: str, build: str) -> list[str]:
    return ["cmake", "-S", source, "-B", build, *CMAKE_OPTIONS]


def build_command(build: str, jobs: int) -> list[str]:
    return ["cmake", "--build", build, "--config", "Release", "--target", TARGET, "-j", str(jobs)]


def vendored_root(member_name: str) -> Optional[str]:
    """"pkg-1.0/vendor/llama.cpp" for any path inside an sdist's vendored llama.cpp, else None."""
    parts = member_name.split("/")
    for i in (0, 1):  # at the top, or in the sdist's one top folder (not in .git/modules/)
        if parts[i:i + 2] == VENDORED.split("/"):
            return "/".join(parts[:i + 2])
    return None


def extract_vendored(sdist: str, directory: str) -> str:
    """The sdist's vendor/llama.cpp tree extracted under `directory`; its path."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if vendored_root(m.name)]
        if not members:
            raise BuildError(f"{sdist}: no {VENDORED} inside")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(directory, members=members, **kwargs)
    return os.path.join(directory, vendored_root(members[0].name))


def build_percent(line: str) -> Optional[int]:
    """45 for a CMake progress line "[ 45%] Building CXX object ...", else None."""
    line = line.lstrip()
    if not line.startswith("[") or "%]" not in line[:6]:
        return None
    try:
        return int(line[1:line.index("%]")])
    except ValueError:
        return None


def run_logged(cmd: Sequence[str], log_path: str, step: str,
               on_line: Optional[Callable[[str], None]] = None) -> None:
    """Runs cmd with its output appended to log_path (each line also to on_line); BuildError on failure."""
    with open(log_path, "a", buffering=1) as log_file:  # line-buffered: the log can be followed
        log_file.write(f"$ {' '.join(cmd)}\n")
        log_file.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, errors="replace")
        except OSError as exc:
            raise BuildError(f"{step}: cannot run {cmd[0]}: {exc}") from None
        with proc:
            for line in proc.stdout:
                log_file.write(line)
                if on_line is not None:
                    on_line(line)
    if proc.returncode != 0:
        raise BuildError(f"{step} failed (exit code {proc.returncode}); its output: {log_path}")


def progress_printer(every: int = 10) -> Callable[[str], None]:
    """An on_line for the build: says the percentage each time it passes a multiple of `every`."""
    shown = [-1]

    def on_line(line: str) -> None:
        percent = build_percent(line)
        if percent is not None and percent // every > shown[0]:
            shown[0] = percent // every
            say(f"building {TARGET}: {percent}%")
    return on_line


def build(version: str = DEFAULT_VERSION, jobs: Optional[int] = None, sdist: Optional[str] = None,
          force: bool = False) -> str:
    """Builds llama-server once into server_dir(version); returns the binary's path."""
    out = binary_path(version)
    if is_executable(out) and not force:
        say(f"{TARGET} is already built: {out}")
        return out
    root = server_dir(version)
    os.makedirs(root, exist_ok=True)
    log_path = os.path.join(root, "build.log")
    with open(log_path, "w"):
        pass
    work = tempfile.mkdtemp(prefix=".build-", dir=root)
    try:
        if sdist is None:
            say(f"downloading the llama-cpp-python {version} source (it vendors llama.cpp)")
            run_logged(download_command(version, work), log_path, "pip download")
            found = glob.glob(os.path.join(work, "*.tar.gz"))
            if not found:
                raise BuildError(f"pip download left no .tar.gz in {work} (see {log_path})")
            sdist = found[0]
        say(f"extracting {VENDORED} from {os.path.basename(sdist)}")
        source = extract_vendored(sdist, work)
        build_dir = os.path.join(work, "build")
        say("configuring with CMake")
        run_logged(configure_command(source, build_dir), log_path, "cmake configure")
        jobs = jobs or os.cpu_count() or 1
        say(f"building {TARGET} with {jobs} jobs: this takes minutes (output in {log_path})")
        run_logged(build_command(build_dir, jobs), log_path, "cmake build", progress_printer())
        built = os.path.join(build_dir, "bin", TARGET)
        if not is_executable(built):
            raise BuildError(f"the build left no {built} (see {log_path})")
        shutil.move(built, out + ".partial")
        os.replace(out + ".partial", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"built {out}")
    return out


def main_from_args(args) -> int:
    try:
        build(args.version, args.jobs, args.sdist, args.force)
    except (BuildError, OSError, tarfile.TarError) as exc:
        log_path = os.path.join(server_dir(args.version), "build.log")
        if isinstance(exc, BuildError) and os.path.isfile(log_path):
            print("the build's last lines:", *(f"  {line}" for line in log_tail(log_path)), sep="\n",
                  file=sys.stderr)
        print(f"kvloom build-llama-server: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---- running it ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(binary: str, model_path: str, port: int, num_slots: int, slot_context: int,
                   num_threads: int) -> list[str]:
    """llama-server on 127.0.0.1:port with `num_slots` sequences decoding at once (continuous batching),
    each with `slot_context` tokens of KV (--ctx-size is the total, split over the slots)."""
    return [binary, "--model", model_path, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(num_slots), "--ctx-size", str(num_slots * slot_context), "--cont-batching",
            "--threads", str(num_threads), "--threads-batch", str(num_threads)]


def log_tail(path: str, num_lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last non-empty lines of a log file (["(no output)"] when there are none)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return ["(no log)"]
    return [line[:300] for line in lines[-num_lines:]] or ["(no output)"]


async def wait_healthy(url: str, proc: asyncio.subprocess.Process, log_path: str, timeout_s: float) -> None:
    """Until GET /health answers 200; LlamaServerError when the server exits or the deadline passes."""
    import aiohttp

    from kvloom.tools.http_client import request_json

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            status, _ = await request_json(session, "GET", url + "/health", timeout_s=5)
            if status == 200:
                return
            if time.monotonic() >= deadline:
                raise LlamaServerError(f"{TARGET} was not healthy within {timeout_s:.0f}s (last /health: "
                                       f"{status}): {log_tail(log_path, 1)[0]}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), HEALTH_POLL_S)  # the poll interval, cut short by an exit
                raise LlamaServerError(f"{TARGET} exited with code {proc.returncode}: "
                                       f"{log_tail(log_path, 1)[0]}")


async def stop(proc: asyncio.subprocess.Process, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's own PID, SIGKILL when it has not exited after grace_s."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def running_server(binary: str, model_path: str, num_slots: int, slot_context: int, num_threads: int,
                         start_timeout_s: float):
    """llama-server on a free loopback port; yields its base URL; stopped on exit. On any failure
    (start or while in use) the last lines of its log go to stderr."""
    port = free_port()
    cmd = server_command(binary, model_path, port, num_slots, slot_context, num_threads)
    with tempfile.TemporaryDirectory(prefix="kvloom-llama-server-") as tmp:
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_healthy(url, proc, log_path, start_timeout_s)
            say(f"{TARGET} (pid {proc.pid}) on {url}: {num_slots} slots of {slot_context} tokens")
            yield url
        except Exception:
            print(f"{TARGET} log ({' '.join(cmd)}), last lines:", file=sys.stderr)
            for line in log_tail(log_path):
                print(f"  {line}", file=sys.stderr)
            raise
        finally:
            await stop(proc)
