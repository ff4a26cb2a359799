"""What the measuring tools send: synthetic prompts and the request bodies built from them.

    prompt_id_range(vocab) -> the ids synthetic prompts draw from; random_prompts(...) -> id prompts
    WORDS: common short words, about one token each, for text prompts
    speculative_workloads() -> chat messages of a repeat-the-text and a chat workload (bench_engine)
    Workload (from `kvloom bench`/`soak` options) + seeded RNG + SharedPrefix
        -> request_specs(): an endless stream of RequestSpecs (a path and a JSON body)

Pure and deterministic: no I/O but reading a --prompts-file, no clock; tests drive it with seeds.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from kvloom.tools.command_args import UsageError

PROMPT_ID_LOW, PROMPT_ID_HIGH = 100, 1000

# Common short English words: about one token each for the usual BPE vocabularies.
WORDS = tuple("""
the of and to in is that it for on with as was at by be this have from or one had not but what all
were when we there can an your which their said if do will each about how up out them then she many
some so these would other into has more her two like him see time could no make than first been its
who now people my made over did down only way find use may water long little very after words called
just where most know get through back much before go good new write our used me man too any day same
right look think also around another came come work three word must because does part even place
well such here take why things help put years different away again off went old number great tell
men say small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always
""".split())


# A passage the "repeat" workload asks the model to reproduce: an answer that copies its prompt, as
# summaries, edits and retrieval answers largely do.
PASSAGE = """\
Lighthouses were built to warn ships away from rocks and to guide them into safe harbours at night. \
The earliest ones were simple fires kept burning on hilltops near the coast. Later, towers of stone \
raised the light higher, so that it could be seen from farther out at sea. In the nineteenth century, \
glass lenses made the beam far brighter, and each lighthouse was given its own pattern of flashes, so \
that sailors could tell one light from another. The keepers who lived in the towers trimmed the wicks, \
wound the clockwork that turned the lens, and wrote the weather in a log every few hours. Their work was \
lonely and often dangerous, especially during winter storms. Today most lighthouses run on their own, \
powered by electricity and watched from far away, and many of the old towers have become museums that \
tell the story of the people who kept the lights burning."""
CHAT_QUESTIONS = (
    "Explain how a bicycle works, in a few sentences.",
    "Write a short story about a robot that learns to paint.",
    "What are three good habits for staying healthy? Explain each briefly.",
)


def speculative_workloads() -> dict[str, list[list[dict]]]:
    """Chat conversations per workload: "repeat" (reproduce a passage: the answer repeats its prompt,
    where prompt lookup drafts well) and "chat" (open questions: drafts come only from the answer's own
    repetitions)."""
    return {
        "repeat": [[{"role": "user", "content": f"Repeat the following text exactly.\n\n{PASSAGE}"}]],
        "chat": [[{"role": "user", "content": question}] for question in CHAT_QUESTIONS],
    }


def prompt_id_range(vocab_size: Optional[int]) -> tuple[int, int]:
    """[low, high) for synthetic prompt ids: [100, 1000), clipped to a small vocabulary (tiny test
    models); None: the vocabulary is unknown (a remote server), the ids stay in [100, 1000)."""
    high = PROMPT_ID_HIGH if vocab_size is None else min(PROMPT_ID_HIGH, vocab_size)
    low = PROMPT_ID_LOW if high > 2 * PROMPT_ID_LOW else min(3, high - 1)
    return low, high


def random_prompts(rng: np.random.Generator, num_prompts: int, num_tokens: int,
                   id_range: tuple[int, int]) -> list[list[int]]:
    """num_prompts distinct-by-chance prompts of num_tokens ids each."""
    return rng.integers(id_range[0], id_range[1], size=(num_prompts, num_tokens)).tolist()


@dataclass(frozen=True)
class LengthDist:
    """Token counts: fixed (a), uniform integers in [a, b], or normal(mean a, std b); always >= 1."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "uniform":
            value = rng.integers(int(self.a), int(self.b) + 1)
        elif self.kind == "normal":
            value = round(rng.normal(self.a, self.b))
        else:
            value = self.a
        return max(1, int(value))

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform[{int(self.a)}, {int(self.b)}]"
        if self.kind == "normal":
            return f"normal({self.a:g}, {self.b:g})"
        return str(int(self.a))


def parse_length_dist(spec: str, base: int) -> LengthDist:
    """"fixed" | "uniform[:LO:HI]" | "normal[:STD]" | "normal:MEAN:STD" around the base length
    (uniform defaults to [base/2, 3*base/2], normal to std base/4)."""
    if base < 1:
        raise ValueError(f"the length must be >= 1, got {base}")
    kind, *params = spec.split(":")
    try:
        values = [float(p) for p in params]
    except ValueError:
        raise ValueError(f"length distribution {spec!r}: parameters must be numbers") from None
    if kind == "fixed" and not values:
        return LengthDist("fixed", base)
    if kind == "uniform" and len(values) in (0, 2):
        low, high = values or (max(1, base // 2), max(1, base * 3 // 2))
        if not 1 <= low <= high or low != int(low) or high != int(high):
            raise ValueError(f"length distribution {spec!r}: need integers 1 <= LO <= HI")
        return LengthDist("uniform", low, high)
    if kind == "normal" and len(values) <= 2:
        mean, std = values if len(values) == 2 else (base, values[0] if values else base / 4)
        if std < 0 or mean < 1:
            raise ValueError(f"length distribution {spec!r}: need MEAN >= 1 and STD >= 0")
        return LengthDist("normal", mean, std)
    raise ValueError(f"length distribution {spec!r}: expected fixed, uniform[:LO:HI], normal[:STD] "
                     "or normal:MEAN:STD")


@dataclass(frozen=True)
class Workload:
    kind: str  # "generate" or "score"
    api: str  # "completions" or "chat"
    prompt_format: str  # "ids" or "text"
    input_len: LengthDist
    output_len: LengthDist
    shared_prefix_ratio: float = 0.0
    id_range: tuple[int, int] = (PROMPT_ID_LOW, PROMPT_ID_HIGH)
    prompts: tuple = ()  # --prompts-file lines: {"prompt": str} or {"messages": [...]}
    extra_body: dict = field(default_factory=dict)
    model: Optional[str] = None
    query_tokens: int = 32
    num_items: int = 8
    item_tokens: int = 16
    label_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestSpec:
    path: str  # "/v1/completions", ...
    body: dict
    is_stream: bool
    num_items: int = 0


class SharedPrefix:
    """The common head of every synthetic prompt: one fixed seeded sequence, grown on demand, so any
    two prompts share min(their prefix lengths) tokens."""

    def __init__(self, seed: int, id_range: tuple[int, int]):
        self.rng = np.random.default_rng([seed, 1])
        self.id_range = id_range
        self.token_ids: list[int] = []
        self.words: list[str] = []

    def take_ids(self, n: int) -> list[int]:
        while len(self.token_ids) < n:
            self.token_ids.extend(self.rng.integers(*self.id_range, size=64).tolist())
        return self.token_ids[:n]

    def take_words(self, n: int) -> list[str]:
        while len(self.words) < n:
            self.words.extend(WORDS[i] for i in self.rng.integers(0, len(WORDS), size=64))
        return self.words[:n]


def synthetic_prompt(workload: Workload, rng: np.random.Generator, prefix: SharedPrefix, num_tokens: int):
    """Token ids (exact length) or text of about num_tokens words; the first
    round(shared_prefix_ratio * num_tokens) of them are the shared prefix."""
    num_shared = round(workload.shared_prefix_ratio * num_tokens)
    if workload.prompt_format == "ids":
        own = rng.integers(*workload.id_range, size=num_tokens - num_shared).tolist()
        return prefix.take_ids(num_shared) + own
    own_words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=num_tokens - num_shared)]
    words = prefix.take_words(num_shared) + own_words
    return " ".join(words)


def _body(workload: Workload) -> dict:
    """--extra-body and the model; the tool's own fields are set after it, so they win."""
    body = dict(workload.extra_body)
    if workload.model is not None:
        body["model"] = workload.model
    return body


def _generation_spec(workload: Workload, max_tokens: int, prompt=None, messages=None) -> RequestSpec:
    """A streamed request."""
    body = _body(workload)
    if workload.api == "chat":
        path = "/v1/chat/completions"
        body["messages"] = messages or [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    body.update(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    return RequestSpec(path, body, is_stream=True)


def _score_spec(workload: Workload, rng: np.random.Generator, prefix: SharedPrefix) -> RequestSpec:
    body = _body(workload)
    body["query"] = synthetic_prompt(workload, rng, prefix, workload.query_tokens)
    body["items"] = random_prompts(rng, workload.num_items, workload.item_tokens, workload.id_range)
    body["label_token_ids"] = list(workload.label_token_ids)
    return RequestSpec("/v1/score", body, is_stream=False, num_items=workload.num_items)


def request_specs(workload: Workload, rng: np.random.Generator,
                  prefix: SharedPrefix) -> Iterator[RequestSpec]:
    """The endless request stream of a workload: file prompts cycle in order."""
    for i in itertools.count():
        if workload.kind == "score":
            yield _score_spec(workload, rng, prefix)
        elif workload.prompts:
            line = workload.prompts[i % len(workload.prompts)]
            max_tokens = line.get("max_tokens") or workload.output_len.sample(rng)
            yield _generation_spec(workload, max_tokens, line.get("prompt"), line.get("messages"))
        else:
            prompt = synthetic_prompt(workload, rng, prefix, workload.input_len.sample(rng))
            yield _generation_spec(workload, workload.output_len.sample(rng), prompt)


def non_streaming(spec: RequestSpec) -> RequestSpec:
    """The same generation request, answered as one JSON body."""
    body = {k: v for k, v in spec.body.items() if k not in ("stream", "stream_options")}
    return RequestSpec(spec.path, dict(body, stream=False), is_stream=False)


def load_prompts_file(path: str, api: str) -> tuple:
    """JSONL, one {"prompt": str} or {"messages": [...]} (chat api only) per line; blank lines skipped."""
    prompts = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise UsageError(f"--prompts-file: {exc}") from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--prompts-file {path}:{number}: not JSON: {exc}") from None
        if isinstance(line, dict) and isinstance(line.get("prompt"), str):
            prompts.append(line)
        elif isinstance(line, dict) and isinstance(line.get("messages"), list) and line["messages"]:
            if api != "chat":
                raise UsageError(f"--prompts-file {path}:{number}: a messages line needs --api chat")
            prompts.append(line)
        else:
            raise UsageError(f"--prompts-file {path}:{number}: expected {{\"prompt\": str}} or "
                             "{\"messages\": [...]}")
    if not prompts:
        raise UsageError(f"--prompts-file {path}: no prompts")
    return tuple(prompts)
