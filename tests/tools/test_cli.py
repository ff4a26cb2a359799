"""The `kvloom` command line: `kvloom chat` answers through the Engine as transformers does, the serve
path loads no benchmark module, the tools' imports form no cycle, and the engine flags become the
config they name."""

import argparse
import ast
import os
import subprocess
import sys

import pytest

from kvloom.engine.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig, SpeculativeConfig
from kvloom.tools.cli import build_parser
from kvloom.tools.engine_args import add_engine_args, engine_config_from_args
from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(120)

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")

# What `kvloom serve` runs up to uvloop.run: the parser, the config, the server and the engine.
SERVE_IMPORTS = """
import sys
from kvloom.tools.cli import build_parser
from kvloom.tools.engine_args import engine_config_from_args
args = build_parser().parse_args(["serve", "--num-pages", "64", "--compile-cache", ""])
engine_config_from_args(args, serve=True)
import kvloom.api.server, kvloom.engine.engine, kvloom.engine.faults, uvloop
print(" ".join(sorted(name for name in sys.modules if name.startswith("kvloom.tools."))))
"""


def test_serve_loads_no_benchmark_module():
    out = subprocess.run([sys.executable, "-c", SERVE_IMPORTS], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert loaded == {"kvloom.tools.cli", "kvloom.tools.command_args", "kvloom.tools.engine_args",
                      "kvloom.tools.serve_args", "kvloom.tools.tune_args", "kvloom.tools.flag_file"}


def tools_imports() -> dict[str, set[str]]:
    """module -> the kvloom.tools modules it imports anywhere (at the top or inside a function)."""
    graph = {}
    for file in sorted(os.listdir(TOOLS)):
        if not file.endswith(".py") or file == "__init__.py":
            continue
        with open(os.path.join(TOOLS, file)) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "kvloom.tools":
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvloom.tools."):
                imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[2] for alias in node.names
                                if alias.name.startswith("kvloom.tools."))
        graph[file[:-3]] = imported
    return graph


def test_tools_modules_import_no_cycle():
    graph = tools_imports()
    assert graph["cli"] == {"command_args", "engine_args", "serve_args", "tune_args", "flag_file", "bench",
                            "compare", "soak", "fault_gate", "tune", "router_cli", "llama_server"}
    assert set().union(*graph.values()) <= set(graph), "every imported tools module exists"
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_serve_flags_make_the_engine_config():
    args = build_parser().parse_args(["serve", "--model", "m.gguf", "--dtype", "bfloat16", "--max-running",
                                      "3",
                                      "--num-pages", "64", "--policy", "lpm", "--seed", "7", "--step-timeout",
                                      "5", "--no-prefix-cache", "--max-model-len", "128"])
    config = engine_config_from_args(args, serve=True)
    assert (config.model, config.dtype, config.max_model_len, config.seed, config.step_timeout_s) == (
        "m.gguf", "bfloat16", 128, 7, 5.0)
    assert config.scheduler == SchedulerConfig(max_running=3, policy="lpm")
    assert config.cache == CacheConfig(num_pages=64, enable_prefix_cache=False)
    defaults = engine_config_from_args(build_parser().parse_args(["serve"]), serve=True)
    # no flag given: the config's own defaults, with the start cache inside the default compile cache
    start_cache = os.path.join(os.path.expanduser("~/.cache/kvloom/jax"), "kvloom")
    assert defaults == EngineConfig(start_cache_dir=start_cache)
    no_cache = build_parser().parse_args(["serve", "--compile-cache", ""])
    assert engine_config_from_args(no_cache, serve=True) == EngineConfig()


def test_dtype_flags_make_the_engine_config():
    args = build_parser().parse_args(["serve", "--dtype", "float16", "--kv-cache-dtype", "bfloat16"])
    config = engine_config_from_args(args, serve=True)
    assert (config.dtype, config.kv_cache_dtype, config.resolved_kv_cache_dtype) == (
        "float16", "bfloat16", "bfloat16")
    chat = engine_config_from_args(build_parser().parse_args(["chat", "--dtype", "bfloat16"]))
    assert (chat.dtype, chat.resolved_kv_cache_dtype) == ("bfloat16", "bfloat16")  # auto: the weights'
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])


def test_benchmark_flags_fall_back_to_the_command_sizes():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=11)  # a benchmark's own prompt seed, not the engine's
    add_engine_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "lpm"])  # a server flag: benchmarks do not take it
    config = engine_config_from_args(parser.parse_args([]), dtype="float32", max_running=9)
    assert config.scheduler.max_running == 9 and config.seed == EngineConfig().seed
    config = engine_config_from_args(parser.parse_args(["--max-running", "2", "--page-size", "4"]),
                                     max_running=9)
    assert config.scheduler.max_running == 2 and config.cache.page_size == 4


def test_speculative_flags_on_every_engine_command():
    args = build_parser().parse_args(["serve", "--speculative", "ngram", "--num-speculative-tokens", "6",
                                      "--prompt-lookup-max", "4", "--prompt-lookup-min", "2"])
    assert engine_config_from_args(args, serve=True).speculative == SpeculativeConfig(
        method="ngram", num_speculative_tokens=6, prompt_lookup_max=4, prompt_lookup_min=2)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)  # what bench_engine, bench_score, compare and chat declare
    config = engine_config_from_args(parser.parse_args(["--speculative", "ngram"]), max_running=9)
    assert config.speculative == SpeculativeConfig(method="ngram") and not EngineConfig().speculative.enabled
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative", "medusa"])
    with pytest.raises(ConfigError, match="^num_speculative_tokens"):
        engine_config_from_args(build_parser().parse_args(["serve", "--num-speculative-tokens", "0"]),
                                serve=True)


def test_chat_answers_greedily_as_transformers_does(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from kvloom.engine.models.loader import resolve_source
    from kvloom.engine.tokenizer import Tokenizer

    kvloom = os.path.join(os.path.dirname(sys.executable), "kvloom")
    out = subprocess.run([kvloom, "chat", "Name a colour.", "--model", tiny_llama, "--max-tokens", "6",
                          "--max-model-len", "128", "--page-size", "4", "--compile-cache", _JAX_CACHE],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert "kvloom: loaded" in out.stderr

    tokenizer = Tokenizer.load(resolve_source(tiny_llama))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    answer = ids[0, len(prompt):].tolist()
    assert out.stdout == tokenizer.decode(answer) + "\n"



@pytest.mark.parametrize("argv, message", [
    (["serve", "--max-running", "-1"], "kvloom serve: error: --max-running: must be positive, got -1"),
    (["serve", "--layers-per-call", "-2"], "kvloom serve: error: --layers-per-call: must be 0 (auto)"),
    (["chat", "--chunk-size", "4096"], "kvloom chat: error: --chunk-size: 4096 exceeds max_tokens_per_step"),
])
def test_a_value_the_engine_refuses_is_a_usage_error_naming_the_flag(argv, message, capsys):
    """No traceback: exit status 2 and one line naming the flag, as argparse does for a malformed value."""
    from kvloom.tools.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


@pytest.mark.parametrize("tool", ["bench_engine", "profile_step", "compare"])
def test_the_benchmark_tools_report_a_refused_value_the_same_way(tool):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", f"kvloom.tools.{tool}", "--max-running", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("error: --max-running: must be positive, got 0")
    assert "Traceback" not in proc.stderr
