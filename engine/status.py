"""What an engine reports about itself, read from it and changing nothing:

    engine_status(engine)   the /status route's body and the tools' run records: state, configuration
                            (as resolved at start), start phases, load, caches, speculation, the mesh
    live_metrics(engine)    the gauges engine.metrics reads at each scrape
    start_summary(engine)   the last start's phases, one line for the log
"""

from __future__ import annotations

import time


def live_metrics(engine) -> dict:
    s = engine.scheduler
    cache = s.prefix_cache if s else None
    return dict(
        num_requests_running=s.num_running if s else 0,
        num_requests_waiting=s.num_waiting if s else 0,
        kv_cache_usage_ratio=s.kv_usage() if s else 0.0,
        engine_ready=1.0 if engine.is_ready else 0.0,
        prefix_cache_hits=cache.num_hit_tokens if cache else 0,
        prefix_cache_queries=cache.num_query_tokens if cache else 0,
        num_preemptions=s.num_preemptions if s else 0,
        spec_decode_num_drafts=engine.spec_stats.num_drafts,
        spec_decode_num_draft_tokens=engine.spec_stats.num_draft_tokens,
        spec_decode_num_accepted_tokens=engine.spec_stats.num_accepted_tokens,
    )


def _config(engine) -> dict:
    config, runner = engine.config, engine.runner
    sc, cc, spec = config.scheduler, config.cache, config.speculative
    return {
        "dtype": config.dtype,
        "kv_cache_dtype": config.resolved_kv_cache_dtype,
        "max_model_len": runner.max_model_len if runner else config.max_model_len,
        "page_size": cc.page_size,
        "num_pages": runner.num_pages if runner else cc.num_pages,
        "prefix_cache": cc.enable_prefix_cache,
        "max_running": sc.max_running,
        "max_tokens_per_step": sc.max_tokens_per_step,
        "chunk_size": sc.chunk_size,
        "policy": sc.policy,
        "max_waiting": sc.max_waiting,
        "speculative": spec.method,
        "num_speculative_tokens": spec.num_speculative_tokens if spec.enabled else None,
        "overlap_schedule": config.overlap_schedule,
        "cpu_kernels": config.cpu_kernels,
        "cpu_kernel_in_use": getattr(runner, "cpu_kernels", None) is not None,
        "layers_per_call": getattr(runner, "layers_per_call", None),  # resolved for the model
    }


def engine_status(engine) -> dict:
    live = live_metrics(engine)
    runner = engine.runner
    cache = engine.scheduler.prefix_cache if engine.scheduler else None
    plan = getattr(runner, "kv_cache_plan", None)
    return {
        "state": engine.state.value,
        "state_detail": engine.state_detail,
        "ready": engine.is_ready,
        "last_ready_at": engine.last_ready_at,
        "uptime_s": time.monotonic() - engine.started_at if engine.started_at else 0.0,
        "model": engine.model_name,
        "config": _config(engine),
        "kv_cache": plan.as_dict() if plan else None,
        "start": engine.start_phases.as_dict(getattr(runner, "start_detail", None)) if engine.start_phases
        else None,
        "num_running": live["num_requests_running"],
        "num_waiting": live["num_requests_waiting"],
        "kv_cache_usage": live["kv_cache_usage_ratio"],
        "prefix_cache_hit_rate": cache.hit_rate if cache else 0.0,
        "num_preemptions": live["num_preemptions"],
        # drafts checked, accepted, and the tokens a verify row yields on average (null: speculation off)
        "speculative": engine.spec_stats.as_dict() if engine.config.speculative.enabled else None,
        "num_restarts": engine.num_restarts,
        "parallel": getattr(runner, "parallel_status", None),  # the mesh, per-device KV
    }


def start_summary(engine) -> str:
    """'in 6.2s: load_model 1.1s, tokenizer 0.0s, warmup 2.1s, round_trip 0.1s (51 executables: 51 from
    the start cache, 0 compiled)'; empty before a start has finished."""
    phases = engine.start_phases
    if phases is None or phases.total_s is None:
        return ""
    detail = getattr(engine.runner, "start_detail", None) or {}
    compiled = "" if "executables_loaded" not in detail else (
        f" ({engine.num_compiled_at_ready} executables: {detail['executables_loaded']} from the start "
        f"cache, {detail['executables_compiled']} compiled)")
    return f"in {phases.total_s:.1f}s: {phases.summary()}{compiled}"
