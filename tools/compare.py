"""`kvloom compare`: the same workloads, in one run, on kvloom and on the peers a user would pick
instead on a CPU machine, with kvloom's ratio to each and to the machine's roofline.

    kvloom compare [--model PATH] [--peers hf,llamacpp:f32,llama-server:f32,llama-server:f16]
        [--workloads decode,prefill,shared-prefix,score] [--quick] [--json OUT.json]

Data flow:
  args -> Sizes (full or --quick, then the size options; tools.compare_workloads) and the engine config
  tools.machine: float32 matmul peak (jitted jnp.dot) and copy bandwidth -> Roofline (tok/s bounds)
  kvloom: one Engine, started once; its tokenizer turns random words into the prompts (PromptSet:
      token ids in process; the same ids decoded to text over HTTP, where llama-server takes text);
      the in-process figures; then the same engine behind create_app on loopback, driven by `kvloom
      bench` client processes (tools.compare_systems); the engine is stopped before any peer runs
  peers (tools.command_args.parse_peers: NAME or NAME:FORMAT), each optional, each skipped with a
  one-line message when it cannot run:
      hf               transformers `generate` (one batch of the same prompts), batched forwards to score
      llamacpp:F       llama-cpp-python in process, on the model as a GGUF of format F (f32, f16:
                       tools.gguf_convert; original: the file itself), one sequence at a time
      llama-server:F   llama.cpp's own C++ server (tools.llama_server: built once by `kvloom
                       build-llama-server`, never here) on the same GGUF, one slot per concurrent
                       request, measured over HTTP by the same client and prompts as kvloom's server
  every system: tools.compare_workloads.measure_system -> {figure: {"value", ...}}
  measurements -> rows (tools.compare_report) -> the printed tables and --json

Figures: see tools.compare_workloads. llama-cpp-python runs one sequence at a time: its "@C" figures
are C requests back to back. Over HTTP every request is greedy with ignore_eos (HTTP_BODY), so each
server generates the same number of tokens.
Roofline: compute = peak / (2 x params) tok/s for every figure; decode is also bounded by memory,
batch x bandwidth / (params x 4 bytes) tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import traceback
from typing import Optional, Sequence

import numpy as np

from kvloom.tools.command_args import add_compare_args, peer_format, peer_name
from kvloom.tools.compare_report import build_rows, figures, peer_label, peer_mode, report_lines
from kvloom.tools import llama_server, peers
from kvloom.tools.bench_engine import ready_engine
from kvloom.tools.machine import Roofline, measure_bandwidth, measure_matmul_peak
from kvloom.tools.compare_systems import HttpSystem, KvloomEngineSystem
from kvloom.tools.compare_workloads import (Sizes, as_text, build_prompt_set, log, measure_system,
                                           sizes_from_args)
from kvloom.tools.engine_args import engine_config_from_args, report_config_errors, use_compile_cache
from kvloom.tools.report import write_json
from kvloom.tools.workload import WORDS

HTTP_BODY = {"temperature": 0.0, "ignore_eos": True}  # every server measured over HTTP: greedy, fixed length


def bytes_per_parameter(dtype: str) -> int:
    return np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize  # numpy has no bfloat16


def engine_config(args, sizes: Sizes):
    """--dtype (float32 unless asked, as the peers run); max_running defaults to the largest batch a
    workload submits."""
    return engine_config_from_args(args, dtype=args.dtype,
                                   max_running=max(*sizes.concurrency, sizes.num_shared_requests))


async def measure_kvloom(args, sizes: Sizes, workloads: Sequence[str]) -> dict:
    """Start the engine once: the in-process figures, then the same engine over HTTP. Returns the
    model's facts and both prompt sets (the peers run the same prompts)."""
    from kvloom.api.server import create_app, start_server

    log("starting the kvloom engine (compiles every step shape; about a minute cold)")
    async with ready_engine(engine_config(args, sizes)) as (engine, _):
        tokenizer = engine.tokenizer

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        rng = np.random.default_rng(args.seed)
        in_process = build_prompt_set(encode, rng, sizes)
        over_http = as_text(build_prompt_set(encode, rng, sizes), tokenizer.decode)  # fresh prefixes
        probe_text = " ".join(WORDS[:32])
        facts = dict(model=engine.model_name, source=engine.runner.source,
                     num_parameters=engine.runner.model_config.num_parameters,
                     vocab_size=engine.runner.vocab_size, engine_config=engine.status()["config"],
                     in_process=in_process, over_http=over_http,
                     tokenizer_probe=(probe_text, encode(probe_text)))
        measurements = {"kvloom": await measure_system(KvloomEngineSystem(engine, sizes), in_process, sizes,
                                                       workloads)}
        if args.http and workloads:
            runner, url = await start_server(create_app(engine))
            try:
                server = HttpSystem("kvloom over HTTP", url, sizes, HTTP_BODY, args.request_timeout,
                                    score_vocab_size=engine.runner.vocab_size)
                measurements["kvloom-http"] = await measure_system(server, over_http, sizes, workloads)
            finally:
                await runner.cleanup()
    return dict(facts, measurements=measurements)


def llama_server_slots(sizes: Sizes) -> int:
    """llama-server's --parallel: one slot per request of the largest wave (as kvloom's max_running)."""
    return max(*sizes.concurrency, sizes.num_shared_requests)


async def run_peer(peer: str, args, sizes: Sizes, workloads: Sequence[str], kvloom: dict,
                   model_files: peers.LlamaCppModelFiles) -> tuple[dict, str, Optional[str]]:
    """(measurements, GGUF tag, note) of one peer spec; raises peers.PeerSkipped."""
    name, gguf_format = peer_name(peer), peer_format(peer)
    if name == "hf":
        system = peers.TransformersSystem(kvloom["source"])
        return await measure_system(system, kvloom["in_process"], sizes, workloads), "", None
    if name == "llamacpp":
        peers.import_llama_cpp()  # before converting: a missing package skips at once
        path, tag, note = model_files.get(gguf_format)
        system = peers.LlamaCppSystem(path, sizes, args.llamacpp_threads, kvloom["tokenizer_probe"])
        return await measure_system(system, kvloom["in_process"], sizes, workloads), tag, note
    binary = llama_server.find_binary(args.llama_server)  # before converting: a missing binary skips at once
    if binary is None:
        raise peers.PeerSkipped(llama_server.missing_message())
    path, tag, note = model_files.get(gguf_format)
    async with llama_server.running_server(binary, path, llama_server_slots(sizes), sizes.max_context + 16,
                                           args.llamacpp_threads, args.server_start_timeout) as url:
        system = HttpSystem(peer_label(peer, tag), url, sizes, HTTP_BODY, args.request_timeout)  # no scoring
        return await measure_system(system, kvloom["over_http"], sizes, workloads), tag, note


async def run_compare(args) -> dict:
    sizes = sizes_from_args(args)
    workloads = args.workloads
    use_compile_cache(args.compile_cache)

    log(f"measuring the machine: {args.dtype} matmul peak and memory bandwidth")
    matmul = measure_matmul_peak(sizes.matmul_sizes, sizes.matmul_repeats, args.dtype)
    bandwidth = measure_bandwidth(sizes.copy_mib * 2**20, max(3, sizes.matmul_repeats))

    kvloom = await measure_kvloom(args, sizes, workloads)  # the engine is stopped on return
    measurements = kvloom["measurements"]
    statuses = {}
    model_files = peers.LlamaCppModelFiles(kvloom["source"], args.gguf_cache_dir)
    for peer in args.peers:
        def status(kind: str, message: Optional[str], tag: Optional[str] = None) -> dict:
            return dict(label=peer_label(peer, tag), mode=peer_mode(peer), status=kind, message=message)

        try:
            measurements[peer], tag, note = await run_peer(peer, args, sizes, workloads, kvloom, model_files)
            statuses[peer] = status("ok", note, tag)
        except peers.PeerSkipped as exc:
            statuses[peer] = status("skipped", str(exc))
            log(f"skipping {peer_label(peer)}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one failing peer must not lose the others' figures
            statuses[peer] = status("failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            log(f"{peer_label(peer)} failed: {statuses[peer]['message']}")

    roof = Roofline(matmul["peak_gflops"] * 1e9, bandwidth["bytes_per_s"], kvloom["num_parameters"],
                    bytes_per_parameter=bytes_per_parameter(args.dtype))
    figs = figures(sizes, workloads, roof)
    return dict(
        model=kvloom["model"], source=kvloom["source"].path, num_parameters=kvloom["num_parameters"],
        dtype=args.dtype, cpu_count=os.cpu_count(), workloads=list(workloads), peers=statuses,
        settings=dict(dataclasses.asdict(sizes), quick=args.quick, seed=args.seed, http=args.http,
                      llamacpp_threads=args.llamacpp_threads, llama_server=args.llama_server,
                      llama_server_slots=llama_server_slots(sizes)),
        engine_config=kvloom["engine_config"], machine=dict(matmul=matmul, bandwidth=bandwidth),
        roofline=roof.to_json(), rows=build_rows(figs, measurements, args.peers), measurements=measurements)


def main_from_args(args) -> int:
    """Exit code 0 whatever peers were skipped; 2 for bad options, 1 when kvloom itself cannot run."""
    sizes = sizes_from_args(args)
    bad = [name for name, value in dataclasses.asdict(sizes).items()
           if any(v <= 0 for v in (value if isinstance(value, tuple) else (value,)))]
    if bad:
        print(f"kvloom compare: error: must be positive: {', '.join(bad)}", file=sys.stderr)
        return 2
    engine_config(args, sizes)  # a value the engine refuses raises ConfigError: a usage error, at once
    if args.llama_server and any(peer_name(p) == "llama-server" for p in args.peers):
        try:
            llama_server.find_binary(args.llama_server)
        except ValueError as exc:
            print(f"kvloom compare: error: {exc}", file=sys.stderr)
            return 2
    try:
        report = asyncio.run(run_compare(args))
    except Exception as exc:  # noqa: BLE001 - kvloom itself failed: report it and exit 1
        traceback.print_exc()
        print(f"kvloom compare: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(report)))
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvloom compare", description=__doc__.split("\n\n")[0])
    add_compare_args(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(report_config_errors("kvloom compare", main))
