"""tools.llama_server: the cache path, finding the binary and the message when there is none, the
command lines it runs (no build here), the sdist's vendored tree, `--peers` specs, the server's
lifecycle (health wait, exit, stop by PID) on a stand-in executable, and, only where llama-server is
built, the real server on a tiny GGUF."""

import argparse
import asyncio
import io
import os
import signal
import stat
import sys
import tarfile

import pytest

from kvloom.tools import llama_server
from kvloom.tools.cli import build_parser
from kvloom.tools.command_args import DEFAULT_PEERS, LLAMA_SERVER_VERSION, parse_peers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_executable(path, text: str = "#!/bin/sh\nexit 0\n") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_cache_path_is_the_engines_cache_root(cache, monkeypatch):
    assert llama_server.binary_path() == str(cache / "llama.cpp" / LLAMA_SERVER_VERSION / "llama-server")
    assert llama_server.server_dir("0.3.1") == str(cache / "llama.cpp" / "0.3.1")
    monkeypatch.delenv("KVLOOM_CACHE_DIR")
    monkeypatch.setenv("HOME", "/home/someone")
    assert llama_server.binary_path("1.0") == "/home/someone/.cache/kvloom/llama.cpp/1.0/llama-server"


def test_find_binary_and_the_message_naming_the_build_command(cache, tmp_path):
    assert llama_server.find_binary() is None
    message = llama_server.missing_message()
    assert "`kvloom build-llama-server`" in message and str(cache / "llama.cpp") in message
    assert "\n" not in message
    built = make_executable(cache / "llama.cpp" / LLAMA_SERVER_VERSION / "llama-server")
    assert llama_server.find_binary() == built
    own = make_executable(tmp_path / "bin" / "my-llama-server")
    assert llama_server.find_binary(own) == own  # an explicit one wins
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="--llama-server .*plain: not an executable file"):
        llama_server.find_binary(str(tmp_path / "plain"))


def test_build_does_nothing_when_already_built(cache):
    built = make_executable(cache / "llama.cpp" / "9.9" / "llama-server")
    assert llama_server.build("9.9", sdist="/nonexistent.tar.gz") == built  # no download, no cmake
    assert os.listdir(cache / "llama.cpp" / "9.9") == ["llama-server"]


def test_the_commands_it_runs():
    cmd = llama_server.server_command("/b/llama-server", "/m/model.f16.gguf", 8123, 32, 160, 2)
    assert cmd == ["/b/llama-server", "--model", "/m/model.f16.gguf", "--host", "127.0.0.1", "--port", "8123",
                   "--parallel", "32", "--ctx-size", str(32 * 160), "--cont-batching",
                   "--threads", "2", "--threads-batch", "2"]
    assert llama_server.download_command("0.3.36", "/d")[1:] == [
        "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python==0.3.36", "-d", "/d"]
    configure = llama_server.configure_command("/src", "/build")
    assert configure[:5] == ["cmake", "-S", "/src", "-B", "/build"]
    assert {"-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF"} <= set(configure)  # nothing downloaded while building
    assert llama_server.build_command("/build", 3)[-4:] == ["--target", "llama-server", "-j", "3"]


def test_build_progress_lines():
    assert llama_server.build_percent("[ 45%] Building CXX object common/arg.cpp.o") == 45
    assert llama_server.build_percent("[100%] Linking CXX executable ../../bin/llama-server") == 100
    assert llama_server.build_percent("-- Configuring done") is None
    assert llama_server.build_percent("[abc%] x") is None


def test_the_sdists_vendored_llama_cpp_is_extracted(tmp_path):
    sdist = tmp_path / "llama_cpp_python-1.0.tar.gz"
    files = {"llama_cpp_python-1.0/pyproject.toml": b"[project]",
             "llama_cpp_python-1.0/vendor/llama.cpp/CMakeLists.txt": b"project(llama.cpp)",
             "llama_cpp_python-1.0/vendor/llama.cpp/tools/server/main.cpp": b"int main() {}",
             "llama_cpp_python-1.0/.git/modules/vendor/llama.cpp/HEAD": b"ref"}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = llama_server.extract_vendored(str(sdist), str(tmp_path / "out"))
    assert source == str(tmp_path / "out" / "llama_cpp_python-1.0" / "vendor" / "llama.cpp")
    assert open(os.path.join(source, "tools", "server", "main.cpp")).read() == "int main() {}"
    assert sorted(os.listdir(tmp_path / "out" / "llama_cpp_python-1.0")) == ["vendor"]  # nothing else
    assert llama_server.vendored_root("vendor/llama.cpp/ggml/x.c") == "vendor/llama.cpp"

    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    with pytest.raises(llama_server.BuildError, match="no vendor/llama.cpp inside"):
        llama_server.extract_vendored(str(tmp_path / "empty.tar.gz"), str(tmp_path / "out2"))


def test_peer_specs():
    assert parse_peers("hf,llama-server:f16,llamacpp") == ("hf", "llama-server:f16", "llamacpp:f32")
    assert parse_peers("llama-server,llama-server:f32, llama-server:original") == (
        "llama-server:f32", "llama-server:original")
    assert parse_peers("none") == ()
    for bad, match in (("vllm", "unknown vllm"), ("llama-server:q4", "the format is one of f32, f16"),
                       ("hf:f16", "only llamacpp and llama-server take :FORMAT"),
                       ("llamacpp-server", "unknown llamacpp-server")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse_peers(bad)
    assert build_parser().parse_args(["compare"]).peers == DEFAULT_PEERS
    args = build_parser().parse_args(["compare", "--peers", "llama-server:f16", "--llama-server", "/x/ls"])
    assert args.peers == ("llama-server:f16",) and args.llama_server == "/x/ls"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--peers", "hf,llamacpp-server"])
    build = build_parser().parse_args(["build-llama-server", "--jobs", "3"])
    assert (build.version, build.jobs, build.sdist, build.force) == (LLAMA_SERVER_VERSION, 3, None, False)


def test_compare_refuses_a_llama_server_path_that_is_not_executable(tmp_path, capsys):
    from kvloom.tools import compare

    args = build_parser().parse_args(["compare", "--peers", "llama-server", "--llama-server",
                                      str(tmp_path / "missing")])
    assert compare.main_from_args(args) == 2
    assert "not an executable file" in capsys.readouterr().err


# A stand-in for llama-server: the same flags, /health 503 twice then 200, its PID in a file.
STAND_IN = """#!{python}
import argparse, http.server, os, sys
p = argparse.ArgumentParser()
for flag in ("--model", "--host", "--port", "--parallel", "--ctx-size", "--threads", "--threads-batch"):
    p.add_argument(flag)
p.add_argument("--cont-batching", action="store_true")
args = p.parse_args()
open(os.path.join(os.path.dirname(sys.argv[0]), "pid"), "w").write(str(os.getpid()))
if not os.path.isfile(args.model):
    sys.exit(f"error: failed to load model '{{args.model}}'")
polls = []

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        polls.append(self.path)
        ready = len(polls) > 2
        self.send_response(200 if ready else 503)
        self.end_headers()
        self.wfile.write(b'{{"status": "ok"}}' if ready else b'{{"error": "Loading model"}}')

http.server.HTTPServer((args.host, int(args.port)), Handler).serve_forever()
"""


def test_a_server_is_waited_for_and_stopped_by_its_pid(tmp_path):
    import aiohttp

    binary = make_executable(tmp_path / "bin" / "llama-server", STAND_IN.format(python=sys.executable))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")

    async def run():
        async with llama_server.running_server(binary, str(model), 4, 64, 1, start_timeout_s=30) as url:
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/health") as resp:
                    return resp.status

    assert asyncio.run(run()) == 200
    pid = int((tmp_path / "bin" / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(pid, 0)


def test_a_server_that_exits_fails_at_once_with_its_log(tmp_path, capsys):
    binary = make_executable(tmp_path / "bin" / "llama-server", STAND_IN.format(python=sys.executable))

    async def run():
        async with llama_server.running_server(binary, str(tmp_path / "absent.gguf"), 1, 64, 1, 600):
            pass

    with pytest.raises(llama_server.LlamaServerError, match="exited with code 1: error: failed to load"):
        asyncio.run(run())
    err = capsys.readouterr().err
    assert "llama-server log" in err and "absent.gguf" in err


def test_stop_kills_a_server_that_ignores_sigterm():
    async def run():
        code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code,
                                                    stdout=asyncio.subprocess.PIPE)
        assert await proc.stdout.readline() == b"ready\n"  # SIGTERM is ignored from here on
        await llama_server.stop(proc, grace_s=0.5)
        return proc.returncode

    assert asyncio.run(run()) == -signal.SIGKILL


@pytest.mark.timeout(180)
def test_the_real_llama_server_on_a_tiny_gguf(request, tmp_path):
    """Only where `kvloom build-llama-server` has run: greedy, ignore_eos honoured, slots in parallel."""
    binary = llama_server.find_binary()
    if binary is None:
        pytest.skip(llama_server.missing_message())
    import aiohttp

    from kvloom.tools.http_client import send_request
    from kvloom.tools.slo import RequestRecord
    from kvloom.tools.workload import RequestSpec
    from tests.tiny_models import build_gguf

    model = build_gguf(str(tmp_path / "tiny.gguf"), request.getfixturevalue("tiny_llama"))

    async def run():
        async with llama_server.running_server(binary, model, 2, 128, 1, start_timeout_s=120) as url:
            async with aiohttp.ClientSession() as session:
                async def complete(prompt):  # as kvloom bench sends it: streamed, usage at the end
                    body = {"prompt": prompt, "max_tokens": 7, "temperature": 0.0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
                    rec = RequestRecord()
                    await send_request(session, url, RequestSpec("/v1/completions", body, True), rec, 60)
                    return rec

                return await asyncio.gather(complete("The quick brown fox"), complete("Hello world"))

    for rec in asyncio.run(run()):
        assert rec.error is None and rec.output_tokens == 7 and rec.prompt_tokens > 0
