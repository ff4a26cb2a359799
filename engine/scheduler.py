"""Continuous batching: which tokens of which requests the next step computes.

Pure Python on the event loop thread. Every step, `schedule()` turns the queues
into an immutable `ScheduledBatch` (`engine.batch`: rows of token ids, positions
and page ids, copied out of the requests); the compute thread runs it; `apply()`
takes the `StepResult` and is the only place where a request's tokens, results
and score progress change. `schedule()` does own admission: moving a request
from waiting to running with its pages and prefix-cache lock, growing a decode's
pages, and preempting when the pool is dry; those are resource decisions, and a
batch that is never applied (a refused row) leaves every request where it was.

A request is "extended" by up to n tokens per step: the tokens of
`all_ids[num_computed_tokens:]`. One remaining token is a decode row; more is
a prefill chunk (a fresh prompt, or the prompt and outputs of a preempted
request being recomputed). When a chunk reaches the last token, the step
samples the request's next token. So prefill and decode are the same
operation, mixed in one step under a token budget:

    1. running decodes, oldest first (each needs at most one new page; when the
       pool is dry the newest running request is preempted: its computed pages
       go to the prefix cache, it returns to the front of the queue, and it
       recomputes later, keeping every token it already produced);
    2. running requests still prefilling, a chunk each;
    3. waiting requests, by policy (fcfs, or lpm: longest cached prefix first),
       while running slots, budget, pages and a prefill bucket allow.

Prompt logprobs (`SamplingParams.prompt_logprobs`): each prefill row of such a
request names the prompt token after each of its tokens (`prompt_targets`); the
runner brings back their logprobs and `apply()` records them on the request, once:
the prefix cache serves such a request only the tokens whose logprobs it already
has, and a recomputed chunk after a preemption adds nothing new. With max_tokens 0
the request computes its prompt, samples nothing and ends (`engine.output`).

Stale results: each row carries the request's `version` and start position; a
result whose request was preempted, aborted or advanced since is dropped, so a
stale snapshot can never overwrite or duplicate tokens.

Structured outputs: a sampling row of a request with a grammar carries the bitmask of the tokens its
grammar allows next (`engine.grammar`), read from the request's matcher here; `apply()` advances the
matcher with each token it appends, so the matcher always stands after the request's last output token.

One step ahead (`schedule_ahead`): while a generation step runs, the next one may be built before its
result is applied, when it can only be a decode step of the same requests: nothing waits, and every
running request has a sampling row in the running step that the next step may extend on trust (no
grammar or penalties, which need the pending token on the host; not at its max_tokens; no scoring or
speculation). Each such request gets a decode row one position further whose token is pending
(`ScheduledRow.pending_row`); its pages grow for it without preempting anyone. Anything else returns
None and the engine applies the running step first, so the synchronous `schedule()` decides every
admission, preemption, score step and verify step, and a request left out of a step ahead is never
starved. A request that the pending token ends (a stop token or string) has one row computed in vain,
dropped as stale.

Speculative decoding (`SpeculativeConfig`, `engine.speculative`): a step with decode rows and no prefill
chunk becomes a verify step when some plain greedy request finds drafts in its own tokens. Drafts take
token budget and KV slots: the request's pages grow to cover them from free pages only (never evicting
or preempting for a guess; with too few, it drafts what its pages already hold), and never past what
its max_tokens leaves (so never past the context: `check_fits`). `apply()` appends the confirmed drafts
and the model's next token, and counts as computed only the row's token and its confirmed drafts: the
slots of rejected drafts are overwritten by later steps and never reach the prefix cache.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Optional

from kvloom.engine.batch import PENDING_TOKEN, ScheduledBatch, ScheduledRow, ScoreRow, StepResult
from kvloom.engine.buckets import BucketPlan
from kvloom.engine.config import SchedulerConfig, SpeculativeConfig
from kvloom.engine.pages import PageAllocator
from kvloom.engine.radix_cache import PrefixCache
from kvloom.engine.request import FinishReason, Request, RequestState, TokenLogprob
from kvloom.engine.scoring import pack_items
from kvloom.engine.speculative import SpecDecodeStats, may_draft, num_accepted, propose_ngram

LPM_WINDOW = 64  # waiting requests the lpm policy looks at per pick


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; try again later."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, plan: BucketPlan, allocator: PageAllocator,
                 prefix_cache: PrefixCache, *, page_size: int,
                 speculative: SpeculativeConfig = SpeculativeConfig(),
                 spec_stats: Optional[SpecDecodeStats] = None):
        self.config, self.plan = config, plan
        self.speculative = speculative
        self.spec_stats = spec_stats if spec_stats is not None else SpecDecodeStats()
        self.allocator, self.prefix_cache = allocator, prefix_cache
        self.page_size = page_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._step_ids = itertools.count()
        self.num_preemptions = 0
        self._last_was_score = False

    # ---- queues -------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              error: Optional[str] = None, error_code: Optional[str] = None) -> Optional[Request]:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, reason, error=error, error_code=error_code)
        return request

    def finish(self, request: Request, reason: FinishReason, stop_reason=None, error: Optional[str] = None,
               error_code: Optional[str] = None) -> None:
        if request.is_finished:
            return
        if request.state is RequestState.RUNNING:
            self.running.remove(request)
            self._release(request)
        else:
            self.waiting.remove(request)
        request.state = RequestState.FINISHED
        request.finish_reason, request.stop_reason, request.error = reason, stop_reason, error
        if reason is FinishReason.ERROR:
            request.error_code = error_code or "engine_unavailable"
        self.requests.pop(request.request_id, None)

    # ---- pages --------------------------------------------------------------------------------

    def _num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _allocate(self, n: int, evict: bool = True) -> Optional[list[int]]:
        if n <= 0:
            return []
        if evict and not self.allocator.can_allocate(n):
            self.prefix_cache.evict(n - self.allocator.num_free_pages)
        return self.allocator.allocate(n) if self.allocator.can_allocate(n) else None

    def _grow(self, request: Request, num_tokens: int, evict: bool = True) -> bool:
        pages = self._allocate(self._num_pages_for(num_tokens) - len(request.pages), evict)
        if pages is None:
            return False
        request.pages.extend(pages)
        return True

    def _cache_computed(self, request: Request) -> None:
        num_full = request.num_computed_tokens // self.page_size
        if num_full:
            self.prefix_cache.insert(request.tokens(0, num_full * self.page_size), request.pages[:num_full])

    def _release(self, request: Request) -> None:
        self._cache_computed(request)
        self.prefix_cache.unlock(request.prefix_node)
        self.allocator.release(request.pages)
        request.prefix_node, request.pages = None, []

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0  # a scoring request keeps its scored items; it recomputes the query
        request.version += 1
        request.num_preemptions += 1
        request.state = RequestState.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> Optional[ScheduledBatch]:
        """The next step: score steps alternate with generation steps while both kinds have work."""
        has_scoring = any(r.has_items_to_score for r in self.running)
        if has_scoring and (not self._last_was_score or not self._has_generation_work()):
            self._last_was_score = True
            return self._schedule_score()
        self._last_was_score = False
        batch = self._schedule_generation()
        if batch is None and has_scoring:
            self._last_was_score = True
            return self._schedule_score()
        return batch

    def _has_generation_work(self) -> bool:
        return bool(self.waiting) or any(not r.has_items_to_score for r in self.running)

    def _schedule_score(self) -> ScheduledBatch:
        """A score step of one mode, the oldest scoring request's: packed, one row of as many of its next
        items as the longest packed shape holds; batched, one item per row, from that request and the next
        batched ones, as many rows as a batched shape holds. Changes nothing: `apply` records results."""
        plan = self.plan
        scoring = [r for r in self.running if r.has_items_to_score]
        mode = scoring[0].score.mode
        if mode == "packed":
            request = scoring[0]
            task = request.score
            chosen = pack_items(task.items, task.num_scored, plan.max_score_row_len(mode),
                                plan.score_logits_rows)
            rows = [self._score_row(request, chosen)]
        else:
            rows, longest = [], 0
            for request in (r for r in scoring if r.score.mode == mode):
                task = request.score
                for index in range(task.num_scored, len(task.items)):
                    n = max(longest, len(task.items[index]))
                    if (len(rows) >= plan.score_logits_rows
                            or plan.score_shape(mode, len(rows) + 1, n) is None):
                        break
                    rows.append(self._score_row(request, [index]))
                    longest = n
                else:
                    continue
                break  # the shape is full
        row_len = max(sum(len(t) for _, t in row.items) for row in rows)
        return ScheduledBatch(next(self._step_ids), plan.score_shape(mode, len(rows), row_len),
                              score_rows=tuple(rows), score_mode=mode)

    @staticmethod
    def _score_row(request: Request, indices: list[int]) -> ScoreRow:
        task = request.score
        return ScoreRow(request.request_id, request.version, tuple(request.pages),
                        request.num_computed_tokens,
                        tuple((i, task.items[i]) for i in indices), task.label_ids)

    def _schedule_generation(self) -> Optional[ScheduledBatch]:
        budget = self.config.max_tokens_per_step
        decodes: list[Request] = []
        for request in list(self.running):
            if not request.is_decoding:
                continue
            while not self._grow(request, request.num_computed_tokens + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim in decodes:
                    decodes.remove(victim)
                    budget += 1
                if victim is request:
                    break
            else:
                decodes.append(request)
                budget -= 1

        prefills: list[tuple[Request, int]] = []
        for request in self.running:
            if request.is_prefilling and budget > 0:
                chunk = self._fit_chunk(request.num_tokens - request.num_computed_tokens, budget, prefills)
                if chunk and self._grow(request, request.num_computed_tokens + chunk):
                    prefills.append((request, chunk))
                    budget -= chunk

        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            chunk = self._admit(self._pick_waiting(), budget, prefills)
            if not chunk:
                break
            budget -= chunk

        if not decodes and not prefills:
            return None
        drafts = self._drafts(decodes, budget) if decodes and not prefills else {}
        if drafts:
            return ScheduledBatch(step_id=next(self._step_ids), shape=self.plan.verify_shape(len(decodes)),
                                  decode_rows=tuple(self._row(r, 1, drafts.get(r.request_id, ()))
                                                    for r in decodes))
        shape = self.plan.step_shape(len(decodes), [n for _, n in prefills])
        return ScheduledBatch(
            step_id=next(self._step_ids),
            shape=shape,
            decode_rows=tuple(self._row(r, 1) for r in decodes),
            prefill_rows=tuple(self._row(r, n) for r, n in prefills),
        )

    def schedule_ahead(self, running: ScheduledBatch) -> Optional[ScheduledBatch]:
        """The decode step after `running` (launched, not applied), built before its result: None unless
        every running request may take it (see the module docstring). Changes nothing but pages."""
        if running.score_rows or running.shape.verify_len or self.waiting or self.speculative.enabled:
            return None
        sampled = {row.request_id: (i, row) for i, row in enumerate(running.rows) if row.sample}
        ahead: list[tuple[Request, int, int]] = []
        for request in self.running:
            i, row = sampled.get(request.request_id, (-1, None))
            if (row is None or row.version != request.version or row.start_pos != request.num_computed_tokens
                    or request.score is not None or request.grammar is not None
                    or request.params.has_penalties
                    or len(request.output_ids) + 1 >= request.params.max_tokens):
                return None
            ahead.append((request, i, row.start_pos + len(row.token_ids)))
        if not ahead:
            return None
        for request, _, start in ahead:
            if not self._grow(request, start + 1):
                return None
        rows = tuple(self._pending_row(request, i, start) for request, i, start in ahead)
        return ScheduledBatch(step_id=next(self._step_ids), shape=self.plan.step_shape(len(rows), []),
                              decode_rows=rows)

    def _pending_row(self, request: Request, pending_row: int, start: int) -> ScheduledRow:
        return ScheduledRow(
            request_id=request.request_id, version=request.version, token_ids=(PENDING_TOKEN,),
            start_pos=start, page_ids=tuple(request.pages[:self._num_pages_for(start + 1)]), sample=True,
            params=request.params, seed=request.seed, num_output_tokens=len(request.output_ids) + 1,
            pending_row=pending_row)

    def _drafts(self, decodes: list[Request], budget: int) -> dict[str, tuple[int, ...]]:
        """Speculative decoding: request id -> the drafts its verify row checks, for the plain greedy
        decodes that find some, within the token budget, the tokens their max_tokens leave, and the KV
        slots their pages hold or free pages add. Empty when speculation is off or finds nothing."""
        spec = self.speculative
        limit = spec.disable_by_batch_size
        if not spec.enabled or (limit is not None and len(decodes) > limit):
            return {}
        drafts = {}
        for request in decodes:
            # A verify row yields up to len(drafts) + 1 tokens: no more than max_tokens leaves.
            room = min(spec.num_speculative_tokens, budget,
                       request.params.max_tokens - len(request.output_ids) - 1)
            if room <= 0 or not may_draft(request):
                continue
            proposal = propose_ngram(request.all_ids, room, spec.prompt_lookup_max, spec.prompt_lookup_min)
            if not proposal:
                continue
            first = request.num_computed_tokens + 1  # the row's own token; the drafts come after it
            if not self._grow(request, first + len(proposal), evict=False):
                proposal = proposal[:max(0, len(request.pages) * self.page_size - first)]  # slots it holds
            if proposal:
                drafts[request.request_id] = proposal
                budget -= len(proposal)
        return drafts

    def _fit_chunk(self, remaining: int, budget: int, prefills: list[tuple[Request, int]]) -> int:
        """The chunk a new prefill row may take, within the budget and a compiled prefill shape; 0 if none."""
        if len(prefills) >= self.config.max_prefill_seqs:
            return 0
        chunk = min(remaining, self.config.chunk_size, budget)
        longest = max([n for _, n in prefills], default=0)
        while chunk > 0 and self.plan.prefill_shape(len(prefills) + 1, max(longest, chunk)) is None:
            smaller = [q for q in self.plan.prefill_lens if q < chunk]
            chunk = smaller[-1] if smaller and longest <= smaller[-1] else 0
        return chunk

    def _pick_waiting(self) -> Request:
        if self.config.policy == "fcfs" or self.waiting[0].num_preemptions:
            return self.waiting[0]
        best, best_len = self.waiting[0], -1
        for request in itertools.islice(self.waiting, LPM_WINDOW):
            hit = self.prefix_cache.match_prefix(request.all_ids, self._reusable(request), count_stats=False)
            if hit.num_tokens > best_len:
                best, best_len = request, hit.num_tokens
        return best

    @staticmethod
    def _reusable(request: Request) -> int:
        """How many leading tokens the prefix cache may serve: all but the last (its logits give the next
        token); a request that wants prompt logprobs takes cached pages only for the tokens whose logprobs
        it already has (none at first: it computes its whole prompt, once; after a preemption, it recomputes
        from where its recorded logprobs end at the latest)."""
        limit = request.num_tokens - 1
        if request.wants_prompt_logprobs:
            limit = min(limit, len(request.prompt_logprobs))
        return limit

    def _admit(self, request: Request, budget: int, prefills: list[tuple[Request, int]]) -> int:
        """Move `request` to running with its first chunk scheduled; returns the chunk, or 0 if it must
        wait."""
        match = self.prefix_cache.match_prefix(request.all_ids, self._reusable(request), count_stats=False)
        chunk = self._fit_chunk(request.num_tokens - match.num_tokens, budget, prefills)
        if not chunk:
            return 0
        # Pin the matched prefix before anything is evicted to make room for the rest.
        self.prefix_cache.lock(match.node)
        self.allocator.incref(match.pages)
        pages = self._allocate(self._num_pages_for(match.num_tokens + chunk) - len(match.pages))
        if pages is None:
            self.prefix_cache.unlock(match.node)
            self.allocator.release(match.pages)
            return 0
        self.prefix_cache.record_query(request.num_tokens, match.num_tokens)
        self.waiting.remove(request)
        request.pages = list(match.pages) + pages
        request.prefix_node = match.node
        request.num_computed_tokens = match.num_tokens
        if request.num_preemptions == 0:
            request.num_cached_tokens = match.num_tokens
        request.state = RequestState.RUNNING
        self.running.append(request)
        prefills.append((request, chunk))
        return chunk

    def _row(self, request: Request, n: int, drafts: tuple[int, ...] = ()) -> ScheduledRow:
        start = request.num_computed_tokens
        params = request.params
        ends = start + n == request.num_tokens
        scores_prompt = request.score is not None and not request.score.items
        # the row's tokens are followed by prompt tokens whose logprobs are not recorded yet
        wants_targets = (request.wants_prompt_logprobs and not request.has_all_prompt_logprobs
                         and start + n > len(request.prompt_logprobs))
        sample = ends and request.score is None and params.max_tokens > 0
        return ScheduledRow(
            request_id=request.request_id,
            version=request.version,
            token_ids=request.tokens(start, start + n),
            start_pos=start,
            page_ids=tuple(request.pages[:self._num_pages_for(start + n + len(drafts))]),
            sample=sample,
            params=params,
            seed=request.seed,
            num_output_tokens=len(request.output_ids),
            penalty_prompt_ids=request.prompt_ids if params.has_penalties else (),
            penalty_output_ids=tuple(request.output_ids) if params.has_penalties else (),
            label_ids=request.score.label_ids if ends and scores_prompt else (),
            prompt_targets=request.prompt_ids[start + 1:start + n + 1] if wants_targets else (),
            token_bitmask=request.grammar.bitmask() if sample and request.grammar is not None else None,
            draft_token_ids=drafts,
        )

    def _live(self, request_id: str, version: int) -> Optional[Request]:
        request = self.requests.get(request_id)
        if request is None or request.version != version or request.state is not RequestState.RUNNING:
            return None
        return request

    def apply(self, batch: ScheduledBatch, result: StepResult) -> list[Request]:
        """Apply a step's result: the only place requests change (tokens appended, label logprobs recorded,
        a scoring request finished). Returns the requests with news; whether a generating request is done
        (stop token, stop string, length) is decided after, by `engine.output.next_output`."""
        if batch.score_rows:
            return self._apply_score(batch, result)
        updated = []
        now = time.monotonic()
        num_targets = 0  # prompt targets of the rows before this one (their results are laid end to end)
        for i, row in enumerate(batch.rows):
            targets_at, num_targets = num_targets, num_targets + len(row.prompt_targets)
            request = self.requests.get(row.request_id)
            if (request is None or request.version != row.version or request.state is not RequestState.RUNNING
                    or request.num_computed_tokens != row.start_pos):
                continue  # stale: finished, aborted, preempted or advanced since the batch was built
            if result.row_finite is not None and not result.row_finite[i]:
                self.finish(request, FinishReason.ERROR,
                            error="the model produced non-finite logits for this "
                                                               "request", error_code="request_failed")
                updated.append(request)
                continue
            prompt_was_done = request.num_computed_tokens >= len(request.prompt_ids)
            request.num_computed_tokens += len(row.token_ids)
            if row.prompt_targets:
                self._record_prompt_logprobs(request, row, result, targets_at)
            if not prompt_was_done and request.num_computed_tokens >= len(request.prompt_ids):
                self._cache_computed(request)  # later requests with this prompt prefix reuse it now
                if request.wants_prompt_logprobs and not request.prompt_logprobs_emitted and not row.sample:
                    updated.append(request)  # news: its prompt logprobs (max_tokens 0: its end)
            if row.label_ids:
                request.score.label_logprobs[0] = result.label_logprobs[i, :len(row.label_ids)].tolist()
                request.score.num_scored = 1
                self.finish(request, FinishReason.STOP)
                updated.append(request)
            if not row.sample:
                continue
            tokens = self._sampled_tokens(row, result, i)
            request.num_computed_tokens += len(tokens) - 1  # the confirmed drafts
            token = tokens[0]
            request.output_ids.extend(tokens)
            if request.grammar is not None and not request.grammar.accept(token):
                self.finish(request, FinishReason.ERROR, error_code="request_failed",
                            error=f"token {token} broke the response format: {request.grammar.error}")
                updated.append(request)
                continue
            if row.params.logprobs is not None and result.logprobs is not None:
                k = row.params.logprobs
                top = tuple(zip(result.top_ids[i, :k].tolist(), result.top_logprobs[i, :k].tolist()))
                request.output_logprobs.append(TokenLogprob(token, float(result.logprobs[i]), top))
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            updated.append(request)
        return updated

    def _sampled_tokens(self, row: ScheduledRow, result: StepResult, i: int) -> list[int]:
        """The tokens row i brings: its sampled token; for a verify row, the drafts the model confirmed and
        the model's token after them (counted in the speculative-decoding stats)."""
        if not row.draft_token_ids:
            return [int(result.token_ids[i])]
        greedy = result.verify_token_ids[i]
        accepted = num_accepted(row.draft_token_ids, greedy)
        self.spec_stats.record(len(row.draft_token_ids), accepted)
        return [int(t) for t in greedy[:accepted + 1]]

    @staticmethod
    def _record_prompt_logprobs(request: Request, row: ScheduledRow, result: StepResult, at: int) -> None:
        """Record the row's prompt logprobs (result entries [at, at + len(row.prompt_targets))) that the
        request does not have yet: the target of token i is prompt token start_pos + 1 + i, and the prefix
        cache never serves past the recorded ones (`_reusable`), so they extend the record without a gap."""
        k = row.params.prompt_logprobs
        for i, target in enumerate(row.prompt_targets):
            if row.start_pos + 1 + i != len(request.prompt_logprobs) + 1:
                continue  # recorded before a preemption
            j = at + i
            top = zip(result.prompt_top_ids[j, :k].tolist(), result.prompt_top_logprobs[j, :k].tolist())
            request.prompt_logprobs.append(TokenLogprob(target, float(result.prompt_logprobs[j]), tuple(top)))

    def _apply_score(self, batch: ScheduledBatch, result: StepResult) -> list[Request]:
        updated, k = [], 0
        for row in batch.score_rows:
            request = self._live(row.request_id, row.version)
            for index, _ in row.items:
                if request is not None:
                    label_logprobs = result.label_logprobs[k, :len(row.label_ids)]
                    request.score.label_logprobs[index] = label_logprobs.tolist()
                    request.score.num_scored = index + 1  # items are scheduled, and scored, in order
                k += 1
            if request is not None and request.score.is_done and not request.is_finished:
                self.finish(request, FinishReason.STOP)
                updated.append(request)
        return updated

    # ---- introspection ------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_usage(self) -> float:
        return self.allocator.num_used_pages / self.allocator.num_usable_pages


def check_fits(prompt_len: int, max_tokens: int, max_model_len: int, field: str = "prompt") -> None:
    """Submission-time limits, with the field that breaks them named."""
    if prompt_len >= max_model_len:
        raise ValueError(f"{field}: {prompt_len} tokens is at or over the context length {max_model_len}")
    if prompt_len + max_tokens > max_model_len:
        raise ValueError(
            f"max_tokens: {max_tokens} does not fit; the prompt has {prompt_len} tokens "
            f"and the context length is {max_model_len} (at most {max_model_len - prompt_len})"
        )

