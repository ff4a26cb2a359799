"""The JAX boundary: a `ScheduledBatch` in, a `StepResult` out.

Built and called only on the compute thread. Each step pads the batch into the
arrays of its bucket (`engine.buckets`), runs the forward (`engine.forward`:
compiled pieces, dispatched layer by layer, the KV cache donated to the last
one and returned), then the jitted sampler on the logits (which stay on the
device), and brings back the sampled tokens as numpy arrays:

    step(batch) = collect(launch(batch, prev=None))
    launch(batch, prev)  inputs -> forward (embed reads pending tokens from prev's sampled tokens,
                         still on the device) -> sampler, dispatched without waiting -> Launched
    collect(launched)    waits, copies the results back -> StepResult

The public methods are host-side; the jitted functions are private.

With `parallel.tensor_parallel_size` N the weights and the KV cache live on a
mesh of N devices (`llama.shard_params`, `llama.sharded_kv_cache`); the jitted
functions take their shardings from them, logits stay split over the
vocabulary, and sampled tokens and label logprobs come back whole, so host
results are the same at every degree.

Speculative decoding: a verify step (`shape.verify_len`) lays each decode row out as its
token and its drafts, takes logits at every token and samples each position with the
row's parameters (`_verify_input`, `_verify_step`); the scheduler decides what stands.

Prompt logprobs: the forward also returns the final hidden states of every token
(left on the device); a batch whose rows name prompt targets projects them with
`engine.prompt_logprobs` (one more small jitted function per step length).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from kvloom.engine import prompt_logprobs, sharding, spans
from kvloom.engine.buckets import BucketPlan, StepShape
from kvloom.engine.config import EngineConfig, cache_root
from kvloom.engine.executables import AotFunction, CompileStats, ExecutableCache
from kvloom.engine.forward import LayeredForward, forward_functions
from kvloom.engine.kv_sizing import KVCachePlan, available_memory_bytes, plan_kv_cache
from kvloom.engine.models import llama
from kvloom.engine.models.loader import load_model
from kvloom.engine.request import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from kvloom.engine.sampling import SamplingInput, SamplingOutput, sample
from kvloom.engine.spans import span
from kvloom.engine.batch import ScheduledBatch, ScheduledRow, StepResult
from kvloom.kernels import cpu_kernels

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A step dispatched by `ModelRunner.launch`: its outputs still on the device (or, for a score or
    verify step, its result already)."""

    batch: ScheduledBatch
    positions: list = field(default_factory=list)  # the logits row of each of batch.rows
    sampling: Optional[SamplingInput] = None
    logits: Optional[jax.Array] = None
    hidden: Optional[jax.Array] = None
    out: Optional[SamplingOutput] = None
    result: Optional[StepResult] = None


def _label_logprobs(logits, label_ids):
    # logits: [S, V]; label_ids: [S, K] (padding -1) -> [S, K] log-probabilities under the full vocabulary
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logprobs, jnp.maximum(label_ids, 0), axis=-1)


def _start_cache_path(config: EngineConfig, part: str) -> Optional[str]:
    return os.path.join(os.path.expanduser(config.start_cache_dir), part) if config.start_cache_dir else None


class ModelRunner:
    """The real `Runner` (engine.batch): weights, the paged KV cache and the jitted step."""

    def __init__(self, config: EngineConfig, plan: BucketPlan, *, loaded=None, mesh=None):
        """`loaded` (source, model config, params) with `mesh`: params already placed on that mesh."""
        self.config = config
        self.start_detail: dict = {}  # seconds of each loading step; where warm-up's executables came from
        t0 = started = time.perf_counter()
        self.source, self.model_config, self.params = loaded or load_model(
            config.model, config.dtype, cache_dir=_start_cache_path(config, "weights"))
        cfg = self.model_config
        t1 = time.perf_counter()
        self.mesh = mesh or sharding.make_mesh(config.parallel.tensor_parallel_size)
        if mesh is None:
            self.params = llama.shard_params(self.params, cfg, self.mesh)
            jax.block_until_ready(self.params)
        self.start_detail.update(read_weights_s=t1 - t0, place_weights_s=time.perf_counter() - t1)
        self.plan = plan
        self.platform = self.mesh.devices.flat[0].platform  # "cpu", "gpu", "tpu"
        self.cpu_kernels = self._native_kernels(config)
        self.page_size = config.cache.page_size
        self.max_model_len = config.resolved_max_model_len(cfg)
        self.pages_per_seq = -(-self.max_model_len // self.page_size)
        self.kv_cache_plan = self._plan_kv_cache(config)
        self.num_pages = self.kv_cache_plan.num_pages
        log.info("KV cache: %d pages of %d tokens, %.2f GiB (%s)", self.num_pages, self.page_size,
                 self.kv_cache_plan.num_bytes / 2**30, self.kv_cache_plan.detail)
        self.vocab_size = cfg.vocab_size
        # The KV cache is allocated (zero-filled: seconds for gigabytes) on a thread of its own while warm-up
        # prepares the executables, which need only its shape (kv_struct); the first use of `kv` waits for it.
        self.kv_struct = llama.kv_cache_struct(cfg, self.params, self.num_pages, self.page_size, self.mesh,
                                               config.resolved_kv_cache_dtype)
        self._kv = None
        allocator = ThreadPoolExecutor(1, thread_name_prefix="kvloom-kv-cache")
        self._kv_allocation = allocator.submit(self._allocate_kv)
        allocator.shutdown(wait=False)  # its thread exits once the cache is allocated
        whole = NamedSharding(self.mesh, P())
        # a step's sampled tokens, padded to one length for every shape (SamplingOutput.next_inputs)
        self.max_logits_rows = max(plan.logits_rows(s) for s in plan.all_shapes())
        # name -> (function, jax.jit options), compiled ahead of time (_use_executables): the forward's pieces
        # (engine.forward), the sampler, label and prompt logprobs
        self._jit_functions = dict(
            forward_functions(cfg, self.page_size, self.mesh, self.cpu_kernels),
            sample=(partial(sample, pad_to=self.max_logits_rows), dict(out_shardings=whole)),
            labels=(_label_logprobs, dict(out_shardings=whole)),
            prompt_logprobs=(partial(prompt_logprobs.prompt_logprobs, cfg=cfg), dict(out_shardings=whole)))
        self.max_label_tokens = config.scoring.max_label_tokens
        # min_tokens bans these until enough tokens are out (with the request's stop_token_ids)
        self.eos_token_ids = tuple(cfg.eos_token_ids)
        self.bias_width = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + len(self.eos_token_ids)  # one sampler shape
        self.bitmask_words = -(-self.vocab_size // 32)  # structured outputs' token bitmasks (engine.grammar)
        self._use_executables(config)
        self.start_detail["runner_init_s"] = time.perf_counter() - started

    def _use_executables(self, config: EngineConfig) -> None:
        """Each jitted function called through executables compiled ahead of time (engine.executables),
        kept in `config.start_cache_dir` when set (one process only: a multi-process model's followers
        compile)."""
        self.compile_stats = CompileStats()
        directory = _start_cache_path(config, "executables")
        cache = None
        if directory and not config.parallel.is_multiprocess:
            cache = ExecutableCache(directory, jax.devices())
        mesh = f"mesh {dict(self.mesh.shape)} on devices {[d.id for d in self.mesh.devices.flat]}"
        kernel = self.cpu_kernels and self.cpu_kernels.digest
        statics = f"{self.model_config!r} page_size={self.page_size} {mesh} cpu_kernels={kernel}"
        functions = {name: AotFunction(name, fn, options, statics, cache, self.compile_stats)
                     for name, (fn, options) in self._jit_functions.items()}
        self.layers_per_call = config.layers_per_call_for(self.model_config.num_layers)
        self._forward = LayeredForward(
            functions["embed"], functions["layers"], functions["finish"], self.mesh,
            num_prev_tokens=self.max_logits_rows,
            layers_per_call=self.layers_per_call)
        self._sample = functions["sample"]
        self._labels, self._prompt_logprobs = functions["labels"], functions["prompt_logprobs"]

    def fresh(self) -> "ModelRunner":
        """A new runner with the same weights: a new KV cache and new compiled functions (restart)."""
        return type(self)(self.config, self.plan, loaded=(self.source, self.model_config, self.params),
                          mesh=self.mesh)

    def _native_kernels(self, config: EngineConfig) -> Optional[cpu_kernels.CpuKernels]:
        """The decode steps' native matmul and attention kernels (`EngineConfig.cpu_kernels`): on a CPU, one
        device, where the machine can build them (in the kvloom cache directory, once per machine); else
        None (XLA's ops)."""
        if config.cpu_kernels == "off" or self.platform != "cpu" or self.mesh.size > 1:
            return None
        t0 = time.perf_counter()
        kernel = cpu_kernels.load(os.path.join(cache_root(), "kernels"))
        self.start_detail["cpu_kernel_s"] = time.perf_counter() - t0
        return kernel

    def _plan_kv_cache(self, config: EngineConfig) -> KVCachePlan:
        bytes_per_token = llama.kv_cache_bytes_per_token(self.model_config, config.resolved_kv_cache_dtype,
                                                         llama.num_kv_heads_of(self.params))
        return plan_kv_cache(config.cache, max_running=config.scheduler.max_running,
                             max_model_len=self.max_model_len, bytes_per_token=bytes_per_token,
                             available_bytes=available_memory_bytes())

    def _allocate_kv(self):
        t0 = time.perf_counter()
        kv = llama.sharded_kv_cache(self.model_config, self.params, self.num_pages, self.page_size, self.mesh,
                                    self.kv_struct.dtype)
        jax.block_until_ready(kv)
        self.start_detail["kv_cache_s"] = time.perf_counter() - t0
        return kv

    @property
    def kv(self):
        """The KV cache (k, v), donated to each step and replaced by its result."""
        if self._kv is None:
            self._kv = self._kv_allocation.result()
        return self._kv

    @kv.setter
    def kv(self, value) -> None:
        self._kv = value

    @property
    def parallel_status(self) -> dict:
        """The mesh, and what each of its devices holds of the KV cache (every page, for its heads)."""
        k = self.kv_struct
        return dict(sharding.describe(self.mesh), kv_pages_per_device=self.num_pages,
                    kv_heads_per_device=sharding.shard_shape(k)[2],
                    kv_bytes_per_device=2 * int(np.prod(sharding.shard_shape(k))) * k.dtype.itemsize)

    @property
    def num_compiled(self) -> int:
        """Compiled executables so far: the forward's buckets, the sampler's, labels' and prompt logprobs'."""
        return (self._forward.num_compiled + self._sample._cache_size() + self._labels._cache_size()
                + self._prompt_logprobs._cache_size())

    def compiled_hlo(self, shape: StepShape) -> list[str]:
        """The optimized HLO text of the forward's pieces and the sampler a step of `shape` runs (profiling:
        tools.profile_step names each op of a trace from it). Compiles again, or loads from the cache."""
        step = self._step_input(shape, None)
        texts = self._forward.compiled_hlo(self.params, self.kv, step)
        if not shape.is_score:
            logits = self._forward.prepare(self.params, self.kv, step).out_info[0]
            sampling = self._sampling_input(len(step.logits_indices), [])
            texts.append(self._sample.prepare(logits, sampling).as_text())
        return texts

    # ---- arrays ---------------------------------------------------------------------------------

    def _step_input(self, shape: StepShape, batch: Optional[ScheduledBatch]):
        if shape.is_score:
            return self._score_input(shape, batch)
        if shape.verify_len:
            return self._verify_input(shape, batch)
        d, r, q = shape.num_decode_rows, shape.num_prefill_rows, shape.prefill_len
        width = self.pages_per_seq
        num_tokens = shape.num_tokens
        ids = np.zeros(num_tokens, np.int32)
        pos = np.zeros(num_tokens, np.int32)
        slots = np.zeros(num_tokens, np.int32)  # padding writes page 0
        logits_idx = np.zeros(self.plan.logits_rows(shape), np.int32)
        tables = [np.zeros((d, width), np.int32), np.zeros((r, width), np.int32)]
        past = [np.zeros(d, np.int32), np.zeros(r, np.int32)]
        new = [np.zeros(d, np.int32), np.zeros(r, np.int32)]
        if batch is not None:
            for i, row in enumerate(batch.decode_rows):
                self._fill(row, i, i, tables[0], past[0], new[0], ids, pos, slots)
                logits_idx[i] = i
            for j, row in enumerate(batch.prefill_rows):
                base = d + j * q
                self._fill(row, j, base, tables[1], past[1], new[1], ids, pos, slots)
                logits_idx[d + j] = base + len(row.token_ids) - 1
        segments = []
        if d:
            segments.append(llama.Segment(tables[0], past[0], new[0], 1))
        if r:
            segments.append(llama.Segment(tables[1], past[1], new[1], q))
        return llama.StepInput(ids, pos, slots, logits_idx, tuple(segments))

    def _score_input(self, shape: StepShape, batch: Optional[ScheduledBatch]):
        """Score rows: items extend the shared query with positions restarting at past_len; their KV is
        never kept (written to the padding page); segment ids keep packed items apart."""
        r, q = shape.num_prefill_rows, shape.prefill_len
        ids = np.zeros(r * q, np.int32)
        pos = np.zeros(r * q, np.int32)
        segment_ids = np.full((r, q), -1, np.int32)
        table = np.zeros((r, self.pages_per_seq), np.int32)
        past, new = np.zeros(r, np.int32), np.zeros(r, np.int32)
        logits_idx = np.zeros(self.plan.logits_rows(shape), np.int32)
        k = 0
        for j, row in enumerate(batch.score_rows if batch is not None else ()):
            table[j, :len(row.page_ids)] = row.page_ids
            past[j] = row.past_len
            offset = 0
            for segment, (_, tokens) in enumerate(row.items):
                n, base = len(tokens), j * q + offset
                ids[base:base + n] = tokens
                pos[base:base + n] = row.past_len + np.arange(n)
                segment_ids[j, offset:offset + n] = segment
                logits_idx[k] = base + n - 1
                offset += n
                k += 1
            new[j] = offset
        segment = llama.Segment(table, past, new, q, segment_ids)
        return llama.StepInput(ids, pos, np.zeros(r * q, np.int32), logits_idx, (segment,))

    def _verify_input(self, shape: StepShape, batch: Optional[ScheduledBatch]):
        """Verify rows: D rows of V = verify_len tokens (the row's token, then its drafts, then padding that
        writes page 0), one segment, logits at every token."""
        d, v = shape.num_decode_rows, shape.verify_len
        ids, pos, slots = (np.zeros(d * v, np.int32) for _ in range(3))
        table = np.zeros((d, self.pages_per_seq), np.int32)
        past, new = np.zeros(d, np.int32), np.zeros(d, np.int32)
        for i, row in enumerate(batch.decode_rows if batch is not None else ()):
            self._fill(row, i, i * v, table, past, new, ids, pos, slots, row.token_ids + row.draft_token_ids)
        segment = llama.Segment(table, past, new, v)
        return llama.StepInput(ids, pos, slots, np.arange(d * v, dtype=np.int32), (segment,))

    def _label_ids(self, num_logits: int, rows: list[tuple[int, tuple[int, ...]]]) -> np.ndarray:
        label_ids = np.full((num_logits, self.max_label_tokens), -1, np.int32)
        for i, labels in rows:
            label_ids[i, :len(labels)] = labels
        return label_ids

    def _fill(self, row: ScheduledRow, index, base, table, past, new, ids, pos, slots, tokens=None):
        tokens = row.token_ids if tokens is None else tokens
        n, ps = len(tokens), self.page_size
        pages = np.asarray(row.page_ids, np.int32)
        p = row.start_pos + np.arange(n)
        ids[base:base + n] = tokens
        pos[base:base + n] = p
        slots[base:base + n] = pages[p // ps] * ps + p % ps
        table[index, :len(pages)] = pages
        past[index], new[index] = row.start_pos, n

    def _sampling_input(self, num_logits: int, rows: list[tuple[int, ScheduledRow]]) -> SamplingInput:
        f32 = lambda v: np.full(num_logits, v, np.float32)  # noqa: E731
        temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
        rep, freq, pres = f32(1.0), f32(0.0), f32(0.0)
        top_k = np.zeros(num_logits, np.int32)
        seeds = np.zeros(num_logits, np.uint32)
        counters = np.zeros(num_logits, np.int32)
        any_penalties = any(row.params.has_penalties for _, row in rows)
        for i, row in rows:
            sp = row.params
            temperature[i], top_p[i], min_p[i] = sp.temperature, sp.top_p, sp.min_p
            top_k[i] = sp.top_k if sp.top_k < self.vocab_size else 0  # k >= vocabulary: no filter
            rep[i], freq[i], pres[i] = sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
            seeds[i] = (row.seed ^ (row.seed >> 32)) & 0xFFFFFFFF
            counters[i] = row.num_output_tokens
        # Always host arrays of one shape, so every call hits the same compiled executable.
        prompt_ids = np.full((num_logits, self.max_model_len), -1, np.int32)
        output_ids = prompt_ids.copy()
        if any_penalties:
            for i, row in rows:
                prompt_ids[i, :len(row.penalty_prompt_ids)] = row.penalty_prompt_ids
                output_ids[i, :len(row.penalty_output_ids)] = row.penalty_output_ids
        bias_ids, bias_values = self._bias_table(num_logits, rows)
        bitmask = np.full((num_logits, self.bitmask_words), -1, np.int32)  # all ones: every token allowed
        constrained = [(i, row.token_bitmask) for i, row in rows if row.token_bitmask is not None]
        for i, row_mask in constrained:
            bitmask[i] = row_mask[:self.bitmask_words]
        return SamplingInput(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
            seeds=seeds, counters=counters, prompt_ids=prompt_ids, output_ids=output_ids,
            bias_ids=bias_ids, bias_values=bias_values, token_bitmask=bitmask,
            any_sampled=np.bool_(any(row.params.temperature > 0 for _, row in rows)),
            any_penalties=np.bool_(any_penalties),
            any_logprobs=np.bool_(any(row.params.logprobs is not None for _, row in rows)),
            any_bias=np.bool_((bias_ids >= 0).any()),
            any_bitmask=np.bool_(bool(constrained)),
        )

    def _bias_table(self, num_logits: int, rows: list[tuple[int, ScheduledRow]]):
        """[num_logits, bias_width] (token id, bias): logit_bias, then -inf for what min_tokens bans."""
        ids = np.full((num_logits, self.bias_width), -1, np.int32)
        values = np.zeros((num_logits, self.bias_width), np.float32)
        for i, row in rows:
            sp = row.params
            entries = list(sp.logit_bias)
            if row.num_output_tokens < sp.min_tokens:
                banned = sp.stop_token_ids + (() if sp.ignore_eos else self.eos_token_ids)
                entries += [(t, -np.inf) for t in banned]
            if entries:
                ids[i, :len(entries)], values[i, :len(entries)] = zip(*entries)
        return ids, values

    # ---- steps ----------------------------------------------------------------------------------

    def step(self, batch: ScheduledBatch) -> StepResult:
        return self.collect(self.launch(batch, None))

    def launch(self, batch: ScheduledBatch, prev: Optional["Launched"] = None) -> "Launched":
        """Dispatch a step without waiting for it (JAX runs it after the steps dispatched before); its
        pending rows read their tokens from `prev`'s sampled tokens on the device. A score or verify step
        runs to its result here (no step is built ahead of one)."""
        shape = batch.shape
        if shape.verify_len:
            return Launched(batch, result=self._verify_step(batch))
        with span(spans.INPUTS):
            step = self._step_input(shape, batch)
        num_logits = len(step.logits_indices)
        if shape.is_score:
            with span(spans.DISPATCH):
                logits, _, self.kv = self._forward(self.params, self.kv, step)
                items = [row.label_ids for row in batch.score_rows for _ in row.items]
                labels = self._labels(logits, self._label_ids(num_logits, list(enumerate(items))))
            with span(spans.RESULTS):
                return Launched(batch, result=StepResult(batch.step_id, np.zeros(0, np.int64),
                                                         label_logprobs=np.asarray(labels)[:len(items)]))
        d = shape.num_decode_rows
        positions = list(range(len(batch.decode_rows))) + [d + j for j in range(len(batch.prefill_rows))]
        with span(spans.INPUTS):
            sampled = [(i, row) for i, row in zip(positions, batch.rows) if row.sample]
            sampling = self._sampling_input(num_logits, sampled)
            pending = self._pending(step, batch, prev)
        with span(spans.DISPATCH):
            logits, hidden, self.kv = self._forward(self.params, self.kv, step, pending)
            out = self._sample(logits, sampling)
        return Launched(batch, positions, sampling, logits, hidden, out)

    def collect(self, launched: "Launched") -> StepResult:
        """Wait for a launched step; its results as numpy arrays."""
        if launched.result is not None:
            return launched.result
        with span(spans.RESULTS):
            return self._step_result(launched.batch, launched.positions, launched.sampling, launched.logits,
                                     launched.hidden, launched.out)

    @staticmethod
    def _pending(step: llama.StepInput, batch: ScheduledBatch, prev: Optional["Launched"]):
        """(prev_tokens, prev_index) for the forward's embed: token t of the step is prev's sampled token
        at logits row prev_index[t] when that is >= 0 (decode rows are the step's first tokens); None when
        no row's token is pending."""
        pending = [(i, row) for i, row in enumerate(batch.decode_rows) if row.pending_row >= 0]
        if not pending:
            return None
        if prev is None or prev.out is None:
            raise RuntimeError(f"row {pending[0][1].request_id}: its token comes from a step not launched")
        index = np.full(len(step.token_ids), -1, np.int32)
        for i, row in pending:
            index[i] = prev.positions[row.pending_row]
        return prev.out.next_inputs, index

    def _step_result(self, batch: ScheduledBatch, positions, sampling, logits, hidden, out) -> StepResult:
        prompt = self._prompt_result(batch, hidden)
        index = np.asarray(positions, np.int64)
        label_rows = [(i, row.label_ids) for i, row in zip(positions, batch.rows) if row.label_ids]
        labels = None
        if label_rows:
            label_ids = self._label_ids(len(sampling.temperature), label_rows)
            labels = np.asarray(self._labels(logits, label_ids))[index]
        tokens = np.asarray(out.token_ids)[index]
        finite = np.asarray(out.finite)[index]
        if not bool(sampling.any_logprobs):
            return StepResult(batch.step_id, tokens, label_logprobs=labels, row_finite=finite, **prompt)
        return StepResult(batch.step_id, tokens, np.asarray(out.logprobs)[index],
                          np.asarray(out.top_ids)[index], np.asarray(out.top_logprobs)[index],
                          label_logprobs=labels, row_finite=finite, **prompt)

    def _verify_step(self, batch: ScheduledBatch) -> StepResult:
        """A verify step: every position of a row with drafts is sampled with the row's parameters (plain
        greedy: engine.speculative.may_draft), a row without drafts at its token only; `verify_token_ids`
        holds each row's tokens, `token_ids` and the logprobs those at the row's own token."""
        v = batch.shape.verify_len
        step = self._step_input(batch.shape, batch)
        rows = batch.decode_rows
        lengths = np.asarray([1 + len(row.draft_token_ids) for row in rows], np.int64)
        sampled = [(i * v + j, row) for i, row in enumerate(rows) for j in range(lengths[i])]
        sampling = self._sampling_input(len(step.logits_indices), sampled)
        logits, _, self.kv = self._forward(self.params, self.kv, step)
        out = self._sample(logits, sampling)
        n = len(rows)
        tokens = np.asarray(out.token_ids)[:n * v].reshape(n, v)
        real = np.arange(v)[None, :] < lengths[:, None]
        finite = (np.asarray(out.finite)[:n * v].reshape(n, v) | ~real).all(axis=1)
        first = np.arange(n) * v
        logprobs = ((np.asarray(out.logprobs)[first], np.asarray(out.top_ids)[first],
                     np.asarray(out.top_logprobs)[first]) if bool(sampling.any_logprobs) else (None,) * 3)
        return StepResult(batch.step_id, tokens[:, 0], *logprobs, row_finite=finite, verify_token_ids=tokens)

    def _prompt_result(self, batch: ScheduledBatch, hidden) -> dict:
        """The StepResult fields of the batch's prompt logprobs (none when no row has prompt targets)."""
        d, q = batch.shape.num_decode_rows, batch.shape.prefill_len
        bases = list(range(len(batch.decode_rows))) + [d + j * q for j in range(len(batch.prefill_rows))]
        rows = [(base, row.prompt_targets) for base, row in zip(bases, batch.rows) if row.prompt_targets]
        if not rows:
            return {}
        outputs = self._prompt_logprobs(self.params, hidden, prompt_logprobs.targets(hidden.shape[0], rows))
        chosen, top_ids, top_logprobs = prompt_logprobs.gather(outputs, rows)
        return dict(prompt_logprobs=chosen, prompt_top_ids=top_ids, prompt_top_logprobs=top_logprobs)

    def warmup(self) -> int:
        """Prepare every step shape's forward and the sampler, label and prompt logprobs executables its
        outputs feed: loaded from the compile cache or compiled (in parallel threads), never run. Returns
        the number of executables."""
        t0 = time.perf_counter()
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="kvloom-compile") as pool:
            try:
                self._prepare_all(pool)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        self.start_detail.update(self.compile_stats.as_dict(), warmup_threads=workers,
                                 warmup_s=time.perf_counter() - t0)
        jax.block_until_ready(self.kv)
        return self.num_compiled

    def _prepare_all(self, pool: ThreadPoolExecutor) -> None:
        kv = (self.kv_struct, self.kv_struct)  # shapes only: the cache may still be being allocated
        forwards = {pool.submit(self._forward.prepare, self.params, kv, self._step_input(s, None)): s
                    for s in self.plan.all_shapes()}
        followups = []
        for future in as_completed(forwards):
            shape = forwards[future]
            logits, hidden, _ = future.result().out_info  # shapes, dtypes and shardings: nothing runs
            num_logits = logits.shape[0]
            if not shape.verify_len:  # label rows are never verify rows
                followups.append(pool.submit(self._labels.prepare, logits, self._label_ids(num_logits, [])))
            if not shape.is_score:
                sampling = self._sampling_input(num_logits, [])
                followups.append(pool.submit(self._sample.prepare, logits, sampling))
            if shape.num_prefill_rows and not shape.is_score:  # prompt targets come in prefill rows only
                followups.append(pool.submit(self._prompt_logprobs.prepare, self.params, hidden,
                                             prompt_logprobs.targets(shape.num_tokens, [])))
        for future in followups:
            future.result()
