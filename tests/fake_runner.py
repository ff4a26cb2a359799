"""A deterministic stand-in for the model runner: outputs computable by hand, nothing compiled.

The next token of a row depends only on the row's last token and its position:
    greedy:   3 + (last * 7 + position) % (vocab - 3)
    sampled:  3 + hash(seed, num_output_tokens) % (vocab - 3)
so ids 0..2 (the tiny tokenizer's special tokens, eos among them) never appear. Another greedy model
of (last, position) may be given (`next_token`): `looping_next_token` falls into loops, as random-weight
models do, so speculative decoding's drafts come true.
A prompt token's logprob depends only on the token and its position (`fake_prompt_logprob`).
A verify row (speculative decoding) gets the greedy token after its token and after each draft.
A structured output's row (a token bitmask) takes that token when its grammar allows it, else the
allowed token at index (that token % the number allowed), eos included when the JSON may end there.
Tests pass hooks to pause a step or make one fail.
It runs one step ahead too (`launch`/`collect`, for `overlap_schedule="on"`): a pending row takes the
token the step before sampled for its row, as the real runner does on the device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Callable, Optional

import numpy as np

from kvloom.engine.config import ModelConfig
from kvloom.engine.grammar import allowed_token_ids
from kvloom.engine.models.loader import resolve_source
from kvloom.engine.batch import StepResult


def fake_next_token(last: int, position: int, vocab_size: int) -> int:
    return 3 + (last * 7 + position) % (vocab_size - 3)


def looping_next_token(last: int, position: int, vocab_size: int) -> int:
    """A greedy model that cycles through ids 3..7 and skips one every 11th position: n-gram drafts hold
    for a few tokens, then one is wrong."""
    return 3 + (last - 3 + 1 + (position % 11 == 0)) % 5


class FakeRunner:
    """A `Runner` (engine.batch) that records every batch it is given."""

    def __init__(self, config, plan, *, num_pages: Optional[int] = None,
                 before_step: Optional[Callable] = None, next_token: Callable = fake_next_token):
        self.config = config
        self.source = resolve_source(config.model)
        with open(os.path.join(self.source.path, "config.json")) as f:
            self.model_config = ModelConfig.from_hf(json.load(f))
        self.plan = plan
        self.vocab_size = self.model_config.vocab_size
        self.page_size = config.cache.page_size
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        self.num_pages = num_pages or config.cache.num_pages or 1024
        self.before_step = before_step
        self.next_token = next_token
        self.num_steps = 0
        self.num_compiled = 0
        self.step_thread: Optional[threading.Thread] = None
        self.batches = []

    def warmup(self) -> int:
        return 0

    def fresh(self) -> "FakeRunner":
        return FakeRunner(self.config, self.plan, num_pages=self.num_pages, before_step=self.before_step,
                          next_token=self.next_token)

    def launch(self, batch, prev=None):
        """Resolve the pending rows from `prev` (a launched (batch, result)), then run the step."""
        rows = []
        for row in batch.decode_rows:
            if row.pending_row >= 0:
                assert prev is not None, "a pending row without the step before it"
                row = dataclasses.replace(row, token_ids=(int(prev[1].token_ids[row.pending_row]),))
            rows.append(row)
        batch = dataclasses.replace(batch, decode_rows=tuple(rows))
        return batch, self.step(batch)

    @staticmethod
    def collect(launched) -> StepResult:
        return launched[1]

    def step(self, batch) -> StepResult:
        self.step_thread = threading.current_thread()
        self.num_steps += 1
        self.batches.append(batch)
        if self.before_step is not None:
            self.before_step(batch)
        return fake_result(batch, self.vocab_size, self.next_token)


def fake_result(batch, vocab_size: int, next_token: Callable = fake_next_token) -> StepResult:
    """The fake model's result for a batch, from the batch alone."""
    if batch.score_rows:
        items = [(row.label_ids, t) for row in batch.score_rows for _, t in row.items]
        return StepResult(batch.step_id, np.zeros(0, np.int64),
                          label_logprobs=np.array([fake_label_logprobs(labels, toks) for labels,
                                                   toks in items]))
    tokens = []
    for row in batch.rows:
        if row.params.temperature > 0:
            h = hash((row.seed, row.num_output_tokens)) & 0x7FFFFFFF
            token = 3 + h % (vocab_size - 3)
        else:
            token = next_token(row.token_ids[-1], row.start_pos + len(row.token_ids) - 1, vocab_size)
        if row.token_bitmask is not None:
            allowed = allowed_token_ids(row.token_bitmask, vocab_size)
            if token not in allowed:
                token = int(allowed[token % len(allowed)])
        tokens.append(token)
    verify = {}
    if batch.shape.verify_len:
        table = np.zeros((len(batch.rows), batch.shape.verify_len), np.int64)
        for i, row in enumerate(batch.rows):
            seq = row.token_ids + row.draft_token_ids
            table[i, :len(seq)] = [next_token(t, row.start_pos + j, vocab_size) for j, t in enumerate(seq)]
        verify = dict(verify_token_ids=table)
    n = len(tokens)
    k = 20
    top_ids = np.tile(np.arange(k), (n, 1))
    labels = np.zeros((n, 32))
    for i, row in enumerate(batch.rows):
        if row.label_ids:
            labels[i] = fake_label_logprobs(row.label_ids, row.token_ids)
    targets = [(row.start_pos + 1 + i, t) for row in batch.rows for i, t in enumerate(row.prompt_targets)]
    prompt = {}
    if targets:
        prompt = dict(prompt_logprobs=np.array([fake_prompt_logprob(t, p) for p, t in targets]),
                      prompt_top_ids=np.tile(np.arange(k), (len(targets), 1)),
                      prompt_top_logprobs=np.full((len(targets), k), -0.125))
    return StepResult(batch.step_id, np.asarray(tokens, np.int64), np.full(n, -0.5),
                      top_ids, np.full((n, k), -1.0), label_logprobs=labels, **prompt, **verify)


def fake_prompt_logprob(token: int, position: int) -> float:
    """The logprob the fake model gives prompt token `token` at `position` (>= 1)."""
    return -0.25 - 0.001 * token - 0.0001 * position


def fake_label_logprobs(labels, tokens) -> np.ndarray:
    """A scoring row's label logprobs: depends on the label and the last token only."""
    out = np.zeros(32)
    out[:len(labels)] = [-1.0 - (label % 5) - 0.001 * tokens[-1] for label in labels]
    return out


def fake_greedy(prompt: list[int], max_tokens: int, vocab_size: int,
                next_token: Callable = fake_next_token) -> list[int]:
    """What FakeRunner produces for a greedy request, computed directly."""
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(next_token(seq[-1], len(seq) - 1, vocab_size))
    return seq[len(prompt):]


def factory(**kwargs):
    """A runner_factory for Engine that builds a FakeRunner with the given hooks."""
    made = []

    def make(config, plan):
        runner = FakeRunner(config, plan, **kwargs)
        made.append(runner)
        return runner

    make.made = made
    return make
