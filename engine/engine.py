"""`Engine`: what a Python program embeds.

    async with Engine(EngineConfig(model=...)) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
            print(out.text, end="")

Data flow. The event loop owns the scheduler, the page allocator, the prefix
cache and every request. `generate()` turns a prompt into a `Request`, queues
it and wakes the engine loop; the loop runs one step at a time:

    batch = scheduler.schedule()                       # immutable snapshot (engine.batch)
    result = await compute.run(runner.step, batch)     # the compute thread
    updated = scheduler.apply(batch, result)           # requests change only here
    _emit(updated)                                     # engine.output.next_output: text, finish -> queue

One step ahead (`EngineConfig.overlap_schedule`, by default on an accelerator only; a runner with
launch/collect): while step N runs on the device, the loop builds and launches step N+1
(`scheduler.schedule_ahead`: the same decodes, their tokens still pending), then collects and applies
N; so the host's work between steps (results, apply, emit, schedule, batch arrays, dispatch) overlaps
the device's. Results are applied in step order.

A structured output (`SamplingParams.response_format`) gets its grammar matcher here, compiled
by the engine's `GrammarCompiler` (engine.grammar), which the first such request builds on a thread of
its own (engine.structured_output); the scheduler reads its bitmask into each row and advances it in `apply`.
What the engine reports about itself (`status()`, the metrics' gauges) is read in engine.status.

Every request, generated or scored, has one output channel: an asyncio queue
that `_emit` feeds. `generate()` streams it; `score()` waits for each of its
requests' final output, which carries the label logprobs.

States: STARTING -> WARMING -> READY; DEGRADED (warm-up failed), FAILED (a
step failed: every request ends with an explicit error), STOPPING -> STOPPED.
Work is refused at once unless READY. Nothing is global: engines are plain
objects, any number per process. A start records its phases (engine.start_phases), logged at READY
and shown in `status()`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
import time
from typing import AsyncIterator, Callable, Optional, Sequence, Union

from kvloom.engine import scoring, spans
from kvloom.engine.batch import RowError, ScheduledBatch, check_runner, runs_ahead
from kvloom.engine.buckets import BucketPlan
from kvloom.engine.config import EngineConfig
from kvloom.engine.executor import ComputeThread
from kvloom.engine.faults import FaultInjector, FaultyRunner
from kvloom.engine.grammar import GrammarCompiler
from kvloom.engine.metrics import EngineMetrics
from kvloom.engine.models.source import resolve_source
from kvloom.engine.output import next_output
from kvloom.engine.kv_events import KVEventLog
from kvloom.engine.pages import PageAllocator
from kvloom.engine.radix_cache import make_prefix_cache
from kvloom.engine.request import (FinishReason, Request, RequestOutput, SamplingParams, ScoreTask,
                                   validate_prompt_ids)
from kvloom.engine.scheduler import QueueFullError, Scheduler, check_fits
from kvloom.engine.scoring import ScoreOutput
from kvloom.engine.spans import span
from kvloom.engine.speculative import SpecDecodeStats
from kvloom.engine.structured_output import StructuredOutput
from kvloom.engine.status import engine_status, live_metrics, start_summary
from kvloom.engine.start_phases import StartPhases
from kvloom.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineState", "EngineNotReadyError", "EngineUnavailableError", "QueueFullError"]


class EngineState(str, enum.Enum):
    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class EngineNotReadyError(RuntimeError):
    """The engine is starting or warming up; retry later."""


class EngineUnavailableError(RuntimeError):
    """The engine failed or is stopping; requests end with this error."""


def _default_runner(config: EngineConfig, plan: BucketPlan):
    from kvloom.engine.runner import ModelRunner  # imports JAX; the engine module itself does not

    return ModelRunner(config, plan)


class Engine:
    def __init__(self, config: Optional[EngineConfig] = None, *,
                 runner_factory: Callable = _default_runner, warmup_gate: Optional[asyncio.Event] = None,
                 faults: Optional[FaultInjector] = None):
        self.config = config or EngineConfig()
        self.faults = faults  # fault injection: None (the default) leaves the runner unwrapped
        self.num_restarts = 0
        self._restart_task: Optional[asyncio.Task] = None
        self.plan = BucketPlan.from_config(self.config.scheduler, self.config.scoring,
                                           self.config.speculative)
        self._runner_factory = runner_factory
        self._warmup_gate = warmup_gate  # tests hold warm-up open with it
        self.state = EngineState.STOPPED
        self.state_detail = "not started"
        self.started_at: Optional[float] = None
        self.last_ready_at: Optional[float] = None
        self.num_compiled_at_ready: Optional[int] = None
        self.tokenizer: Optional[Tokenizer] = None
        self._structured = StructuredOutput(f"kvloom-grammar-{id(self):x}")  # built by the first such request
        self.start_phases: Optional[StartPhases] = None  # the last start's or restart's
        self.runner = None
        self.scheduler: Optional[Scheduler] = None
        self._compute: Optional[ComputeThread] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set while the scheduler has no work
        self._stopping = False
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its output channel
        self._ids = itertools.count()
        self._rng = random.Random(self.config.seed)
        self.spec_stats = SpecDecodeStats()  # speculative decoding's counts; outlive restarts too
        self.metrics = EngineMetrics(lambda: live_metrics(self), lambda: self.model_name)
        self.kv_events = KVEventLog(self.config.cache.page_size)  # outlives restarts: ids stay monotonic

    # ---- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def model_name(self) -> str:
        """The name responses carry: the first served name, else the model's own."""
        if self.config.served_model_names:
            return self.config.served_model_names[0]
        return self.runner.source.name if self.runner else (self.config.model or "default")

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name a request's `model` may give."""
        return self.config.served_model_names or (self.model_name,)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    async def start(self) -> None:
        """Load, warm up, round-trip one real request, then READY. Raises if loading fails;
        a warm-up failure leaves the engine DEGRADED with the reason in `state_detail`."""
        if self.state not in (EngineState.STOPPED,):
            raise RuntimeError(f"start: the engine is {self.state.value}")
        self.started_at = time.monotonic()
        phases = self.start_phases = StartPhases()
        self._set_state(EngineState.STARTING, "loading the model")
        self._compute = ComputeThread(name=f"kvloom-compute-{id(self):x}")
        # The tokenizer loads on a thread of its own while the model loads (its phase: the wait after)
        tokenizer_thread = ComputeThread(name=f"kvloom-tokenizer-{id(self):x}")
        tokenizer = asyncio.ensure_future(tokenizer_thread.run(self._load_tokenizer))
        try:
            with phases.measure("load_model"):
                self.runner = await self._compute.run(self._make_runner)
            with phases.measure("tokenizer"):
                self.tokenizer = (await tokenizer).with_eos_ids(self.runner.model_config.eos_token_ids)
        except BaseException:
            if tokenizer.done() and not tokenizer.cancelled():
                tokenizer.exception()  # retrieved: the model's failure is the one raised
            tokenizer.cancel()
            self._compute.close()
            self._set_state(EngineState.STOPPED, "loading failed")
            raise
        finally:
            tokenizer_thread.close()
        self._build_state()
        self._loop_task = asyncio.get_running_loop().create_task(self._run_loop(), name="kvloom-engine-loop")
        await self._warm_up()

    def _load_tokenizer(self) -> Tokenizer:
        t0 = time.monotonic()
        tokenizer = Tokenizer.load(resolve_source(self.config.model))
        self.start_phases.detail["tokenizer_load_s"] = time.monotonic() - t0
        return tokenizer

    @property
    def grammars(self) -> Optional[GrammarCompiler]:
        """The structured-output compiler once built (None until a request with a response_format)."""
        return self._structured.compiler

    async def structured_output(self) -> GrammarCompiler:
        """The structured-output compiler: built at the first call (the first request with a response_format;
        seconds for a large vocabulary) on a thread of its own, off the event loop, then kept. Raises
        ValueError naming response_format when this model's tokenizer cannot have one."""
        if self._structured.compiler is None and (self.tokenizer is None or self.runner is None):
            raise EngineNotReadyError(f"the engine is {self.state.value}: {self.state_detail}")
        return await self._structured.get(self.tokenizer, self.runner.vocab_size if self.runner else 0)

    def _make_runner(self, previous=None):
        """On the compute thread: a new runner, or a fresh one sharing `previous`'s weights."""
        runner = previous.fresh() if previous is not None else self._runner_factory(self.config, self.plan)
        check_runner(runner)
        return FaultyRunner(runner, self.faults) if self.faults is not None else runner

    async def restart(self) -> None:
        """Rebuild in place after a failure (or at any time): every unfinished request ends with an
        explicit error; a new compute thread, runner and KV cache (the weights are kept); warm-up; READY."""
        if self.state in (EngineState.STOPPED, EngineState.STOPPING, EngineState.STARTING,
                          EngineState.WARMING) or self.runner is None:
            raise RuntimeError(f"restart: the engine is {self.state.value}")
        self._set_state(EngineState.STARTING, "restarting")
        phases = self.start_phases = StartPhases()
        self._fail_all("the engine is restarting")
        await self._cancel_loop()
        previous = self.runner.wrapped if isinstance(self.runner, FaultyRunner) else self.runner
        self._compute.close()  # a hung step keeps the old thread; it exits when the step returns
        self._compute = ComputeThread(name=f"kvloom-compute-{id(self):x}")
        try:
            with phases.measure("load_model"):
                self.runner = await self._compute.run(self._make_runner, previous)
        except Exception as exc:  # noqa: BLE001
            self._set_state(EngineState.FAILED, f"restart failed: {type(exc).__name__}: {exc}")
            raise
        self.num_restarts += 1
        self._build_state()
        self._loop_task = asyncio.get_running_loop().create_task(self._run_loop(), name="kvloom-engine-loop")
        await self._warm_up()

    async def _cancel_loop(self) -> None:
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._loop_task = None

    def _fail(self, detail: str) -> None:
        """The engine cannot go on: FAILED, every request told, and maybe an automatic restart."""
        log.error("engine failed: %s", detail)
        self._set_state(EngineState.FAILED, detail)
        self._fail_all(f"the engine failed: {detail}")
        attempt = self.num_restarts
        if attempt < self.config.max_restarts:
            delay = self.config.restart_backoff_s * (2 ** attempt)
            self._restart_task = asyncio.get_running_loop().create_task(self._restart_later(delay))

    async def _restart_later(self, delay: float) -> None:
        await asyncio.sleep(delay)  # backoff before an automatic restart
        if self.state is EngineState.FAILED:
            try:
                await self.restart()
            except Exception:  # noqa: BLE001 - stays FAILED; the state says why
                log.exception("automatic restart failed")

    def _build_state(self) -> None:
        runner = self.runner
        allocator = PageAllocator(runner.num_pages)
        cache = make_prefix_cache(allocator, runner.page_size, self.config.cache.enable_prefix_cache,
                                  self.kv_events)
        self.scheduler = Scheduler(self.config.scheduler, self.plan, allocator, cache,
                                   page_size=runner.page_size, speculative=self.config.speculative,
                                   spec_stats=self.spec_stats)

    async def _warm_up(self) -> None:
        self._set_state(EngineState.WARMING, "compiling step shapes")
        phases = self.start_phases
        try:
            if self._warmup_gate is not None:
                with phases.measure("held"):  # tests hold warm-up open
                    await self._warmup_gate.wait()
            if self.config.warmup:
                with phases.measure("warmup"):
                    await self._compute.run(self.runner.warmup)
            self.state_detail = "round-tripping one request"
            prompt = [t for t in range(min(8, self.runner.vocab_size))]
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            with phases.measure("round_trip"):
                async for out in self._generate(prompt, params, None, "warmup"):
                    if out.error:
                        raise EngineUnavailableError(out.error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in state_detail
            log.exception("warm-up failed")
            self._set_state(EngineState.DEGRADED, f"warm-up failed: {type(exc).__name__}: {exc}")
            return
        if self.state is EngineState.WARMING:
            self.num_compiled_at_ready = getattr(self.runner, "num_compiled", None)
            self.last_ready_at = time.time()
            phases.finish()
            log.info("engine ready %s", self.start_summary())
            self._set_state(EngineState.READY, "ready")

    def start_summary(self) -> str:
        """The last start's phases, one line for a log (engine.status.start_summary)."""
        return start_summary(self)

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and let in-flight requests finish for up to `timeout` s; True if all did.
        Call stop() afterwards: it ends whatever is left with an explicit error."""
        if self.state is not EngineState.READY or self.scheduler is None:
            return not (self.scheduler and self.scheduler.has_work)
        self._set_state(EngineState.STOPPING, "draining")
        if self.scheduler.has_work:
            self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop: every unfinished request ends with an error at once; then wait up to `timeout` s for a
        step in flight to finish and the compute thread to exit (a hung step is left to its daemon thread)."""
        if self.state is EngineState.STOPPED or self._stopping:
            return
        self._stopping = True
        self._set_state(EngineState.STOPPING, "stopping")
        self._fail_all("the engine is stopping")
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        self._structured.cancel()
        await self._cancel_loop()
        if self._compute is not None and not await self._compute.aclose(timeout):
            log.warning("the compute thread is still busy after %.1fs; leaving it behind", timeout)
        self.runner = None
        self._stopping = False
        self._set_state(EngineState.STOPPED, "stopped")

    def join_compute_thread(self, timeout: Optional[float] = None) -> bool:
        """Wait for the compute thread of the last run to exit (after stop)."""
        return self._compute is None or self._compute.join(timeout)

    def _set_state(self, state: EngineState, detail: str) -> None:
        if state is not self.state:
            log.info("engine %s -> %s (%s)", self.state.value, state.value, detail)
        self.state, self.state_detail = state, detail

    # ---- requests -------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self.state in (EngineState.STARTING, EngineState.WARMING, EngineState.DEGRADED):
            raise EngineNotReadyError(f"the engine is {self.state.value}: {self.state_detail}")
        if self.state is not EngineState.READY:
            raise EngineUnavailableError(f"the engine is {self.state.value}: {self.state_detail}")

    def encode_prompt(self, prompt: Union[str, Sequence[int], None] = None,
                      messages: Optional[list] = None) -> Sequence[int]:
        """Prompt text, token ids or chat messages to token ids, checked once (ids marked as checked pass
        through); ValueError names the bad field."""
        vocab_size = self.runner.vocab_size
        if messages is not None:
            return validate_prompt_ids(self.tokenizer.apply_chat_template(messages), vocab_size, "messages")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return validate_prompt_ids(self.tokenizer.encode(prompt), vocab_size)
        if prompt is None:
            raise ValueError("prompt: required")
        return validate_prompt_ids(prompt, vocab_size)

    def generate(self, prompt: Union[str, Sequence[int], None] = None,
                 params: Optional[SamplingParams] = None,
                 *, messages: Optional[list] = None, request_id: Optional[str] = None
                 ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Validation happens here, at the call: a bad prompt or parameter
        raises ValueError naming the field; a full queue raises QueueFullError; an engine that is not
        READY raises EngineNotReadyError or EngineUnavailableError. Leaving the iteration early (break,
        cancellation) aborts the request and frees its pages. A response_format given before the engine's
        structured-output compiler exists has its schema compiled by the stream, which raises its
        ValueError (`await structured_output()` first to have it at the call, as the API does)."""
        self._check_accepting()
        return self._generate(prompt, params or SamplingParams(), messages, request_id)

    def _new_request(self, prompt, params, messages, request_id) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError("params: must be a SamplingParams")
        ids = self.encode_prompt(prompt, messages)
        params.check_token_ids(self.runner.vocab_size)
        check_fits(len(ids), params.max_tokens, self.runner.max_model_len,
                   field="messages" if messages is not None else "prompt")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        request = Request(request_id or f"req-{next(self._ids)}", tuple(ids), params,
                          eos_token_ids=self.tokenizer.eos_token_ids, seed=seed)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        include_stop = params.include_stop_str_in_output
        request.stop_matcher = StopStringMatcher(params.stop, include_stop) if params.stop else None
        if params.response_format is not None:
            self._structured.check_available()
            if self.grammars is not None:  # else the stream builds the compiler first
                request.grammar = self.grammars.matcher(params.response_format)
        return request

    def _generate(self, prompt, params, messages, request_id) -> AsyncIterator[RequestOutput]:
        request = self._new_request(prompt, params, messages, request_id)
        if params.response_format is not None and request.grammar is None:
            return self._stream_structured(request)
        return self._stream(request, self._submit(request))

    async def _stream_structured(self, request: Request) -> AsyncIterator[RequestOutput]:
        """The first structured requests: the compiler is built, then the matcher (a schema that does not
        compile raises ValueError here), then the request is queued. The API builds the compiler before
        it calls generate(), so its schema errors come at the call."""
        compiler = await self.structured_output()
        request.grammar = compiler.matcher(request.params.response_format)
        self._check_accepting()
        async for out in self._stream(request, self._submit(request)):
            yield out

    def _submit(self, request: Request) -> asyncio.Queue:
        """Queue a request with the scheduler; its outputs arrive on the returned queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self.scheduler.add(request)
        self._queues[request.request_id] = queue
        self._wakeup.set()
        return queue

    async def _stream(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
            if not request.is_finished and self.scheduler is not None:
                self.scheduler.abort(request.request_id)
                self.metrics.requests_finished.labels(FinishReason.ABORT.value).inc()
                self._wakeup.set()

    async def score(self, query, items, label_token_ids, *, apply_softmax: bool = False,
                    item_first: bool = False,
                    mode: Optional[str] = None) -> ScoreOutput:
        """scores[i][j] = P(label_j | query ++ items[i]) (item_first: items[i] ++ query); see SCORING.md.
        `mode` picks the path ("single", "batched", "packed"; default: the config's) among the modes the
        engine has enabled (`ScoringConfig.modes`); item_first always takes the single path (each item
        before the query shares no prefix). Bad input raises ValueError naming the field; cancelling the
        call aborts its requests."""
        self._check_accepting()
        enabled = self.config.scoring.modes
        mode = mode or enabled[0]
        if mode not in enabled:
            raise ValueError(f"mode: {mode!r} is not enabled on this engine (enabled: {', '.join(enabled)})")
        if not isinstance(apply_softmax, bool):
            raise ValueError("apply_softmax: must be a boolean")
        if not isinstance(item_first, bool):
            raise ValueError("item_first: must be a boolean")
        inputs = scoring.encode_inputs(self.tokenizer, query, items, label_token_ids,
                                       vocab_size=self.runner.vocab_size, limits=self.config.scoring,
                                       max_model_len=self.runner.max_model_len)
        if not inputs.items:
            return ScoreOutput([], len(inputs.query))
        if mode == "single" or item_first:
            tasks = [((item + inputs.query) if item_first else (inputs.query + item),
                      ScoreTask((), inputs.label_ids))
                     for item in inputs.items]
        else:
            tasks = [(inputs.query, ScoreTask(inputs.items, inputs.label_ids, mode=mode))]
        submitted: list[tuple[Request, asyncio.Queue]] = []
        try:
            for prompt, task in tasks:
                request = Request(f"score-{next(self._ids)}", tuple(prompt), SamplingParams(max_tokens=1),
                                  score=task)
                submitted.append((request, self._submit(request)))
            outputs = [await queue.get() for _, queue in submitted]  # a scoring request's one output: its end
        finally:
            for request, _ in submitted:
                self._queues.pop(request.request_id, None)
                if not request.is_finished:
                    self.scheduler.abort(request.request_id)
        for out in outputs:
            if out.finish_reason is not FinishReason.STOP:
                raise EngineUnavailableError(out.error or f"scoring ended: {out.finish_reason.value}")
        logprobs = [lp for out in outputs for lp in out.label_logprobs]
        return ScoreOutput([scoring.label_probabilities(lp, apply_softmax) for lp in logprobs],
                           inputs.num_tokens)

    def abort(self, request_id: str) -> bool:
        """Abort a request by id; its stream ends with finish_reason "abort"."""
        request = self.scheduler.abort(request_id) if self.scheduler else None
        if request is None:
            return False
        self._emit([request])
        return True

    # ---- the loop -------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        """The engine loop; a bug in it fails the engine loudly instead of leaving requests hanging."""
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("the engine loop failed")
            self._fail(f"internal error in the engine loop: {type(exc).__name__}: {exc}")

    async def _steps(self) -> None:
        platform = getattr(self.runner, "platform", "cpu")
        ahead = runs_ahead(self.runner) and self.config.overlaps_steps(platform)
        while True:
            if not self.scheduler.has_work:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._idle.clear()
            with span(spans.SCHEDULE):
                batch = self.scheduler.schedule()
            if batch is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not await (self._run_ahead(batch) if ahead else self._run_one(batch)):
                return

    async def _run_one(self, batch: ScheduledBatch) -> bool:
        """Run one step and apply it; False when the engine failed."""
        started = time.monotonic()
        try:
            result = await self._compute.run(self.runner.step, batch, timeout=self.config.step_timeout_s)
        except RowError as exc:
            self._refuse(exc)
            return True
        except Exception as exc:  # noqa: BLE001 (CancelledError is not an Exception: it propagates)
            return self._step_failed(exc)
        self._apply(batch, result, time.monotonic() - started)
        return True

    async def _run_ahead(self, batch: ScheduledBatch) -> bool:
        """Run `batch` and the steps built one ahead of it, until none can be; False when the engine
        failed. Each step is launched before the one before it is collected and applied."""
        started, timeout = time.monotonic(), self.config.step_timeout_s
        try:  # a launch may wait for room in the device's queue, up to a step: it has the watchdog too
            handle = await self._compute.run(self.runner.launch, batch, None, timeout=timeout)
        except RowError as exc:
            self._refuse(exc)
            return True
        except Exception as exc:  # noqa: BLE001
            return self._step_failed(exc)
        while True:
            with span(spans.SCHEDULE):
                following = self.scheduler.schedule_ahead(batch)
            next_handle = None
            if following is not None:
                try:
                    next_handle = await self._compute.run(self.runner.launch, following, handle,
                                                          timeout=timeout)
                except RowError as exc:
                    self._refuse(exc)
                except Exception as exc:  # noqa: BLE001
                    return self._step_failed(exc)
            try:
                result = await self._compute.run(self.runner.collect, handle, timeout=timeout)
            except Exception as exc:  # noqa: BLE001
                return self._step_failed(exc)
            done = time.monotonic()
            self._apply(batch, result, done - started)
            if next_handle is None:
                return True
            batch, handle, started = following, next_handle, done

    def _refuse(self, exc: RowError) -> None:
        """Some rows were refused: those requests fail alone (nothing was applied)."""
        failed = [self.scheduler.abort(rid, FinishReason.ERROR, error=str(exc), error_code="request_failed")
                  for rid in exc.request_ids]
        self._emit([r for r in failed if r is not None])

    def _step_failed(self, exc: Exception) -> bool:
        if isinstance(exc, asyncio.TimeoutError):
            self._fail(f"a step ran past the watchdog timeout of {self.config.step_timeout_s:g}s")
        else:
            log.error("engine step failed", exc_info=exc)
            self._fail(f"step failed: {type(exc).__name__}: {exc}")
        return False

    def _apply(self, batch: ScheduledBatch, result, seconds: float) -> None:
        self.metrics.record_step(batch.num_prefill_tokens, batch.num_tokens, seconds)
        if batch.score_rows:
            self.metrics.record_score_step(batch.score_mode, len(batch.score_rows),
                                           sum(len(row.items) for row in batch.score_rows))
        with span(spans.APPLY):
            self._emit(self.scheduler.apply(batch, result))

    def _fail_all(self, message: str) -> None:
        if self.scheduler is None:
            return
        failed = []
        for request in list(self.scheduler.requests.values()):
            self.scheduler.finish(request, FinishReason.ERROR, error=message)
            failed.append(request)
        self._emit(failed)

    def _emit(self, requests: list[Request]) -> None:
        now = time.monotonic()
        max_model_len = self.runner.max_model_len if self.runner is not None else self.config.max_model_len
        for request in requests:
            out = next_output(request, max_model_len=max_model_len, finish=self.scheduler.finish)
            if request.score is not None and not out.finished:
                continue  # a scoring request's only output is its end
            if request.score is None:
                self._record_metrics(request, len(out.token_ids), now)
            queue = self._queues.get(request.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _record_metrics(self, request: Request, num_new: int, now: float) -> None:
        m = self.metrics
        if num_new:
            m.generation_tokens.inc(num_new)
            if len(request.output_ids) == num_new and request.first_token_time is not None:
                m.time_to_first_token.observe(request.first_token_time - request.arrival_time)
            elif request.last_emit_time is not None:
                m.inter_token_latency.observe((now - request.last_emit_time) / num_new)
            request.last_emit_time = now
        if request.is_finished:
            m.requests_finished.labels(request.finish_reason.value).inc()
            m.prompt_tokens.inc(len(request.prompt_ids))
            m.e2e_latency.observe(now - request.arrival_time)
            if request.finish_reason is FinishReason.ERROR:
                m.request_errors.labels("engine_unavailable").inc()

    # ---- introspection ----------------------------------------------------------------------------

    def status(self) -> dict:
        """State, configuration, start phases, load and caches (engine.status)."""
        return engine_status(self)
