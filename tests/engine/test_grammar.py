"""Grammar matchers and bitmasks (engine/grammar.py) on the tiny tokenizer: no model, no JAX."""

import json

import jsonschema
import numpy as np
import pytest

from kvloom.engine.grammar import GrammarCompiler, allowed_token_ids
from kvloom.engine.models.loader import resolve_source
from kvloom.engine.request import ResponseFormat, SamplingParams
from kvloom.engine.tokenizer import Tokenizer
from tests.schemas import PERSON

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return Tokenizer.load(resolve_source(tiny_llama))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer.hf_tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)


def walk(compiler, tokenizer, response_format, ids):
    """Feed `ids` one by one, checking each was allowed; returns the matcher."""
    matcher = compiler.matcher(response_format)
    eos = tokenizer.eos_token_ids[0]
    for token in ids:
        allowed = allowed_token_ids(matcher.bitmask(), tokenizer.vocab_size)
        assert token in allowed, tokenizer.decode([token])
        assert (eos in allowed) == matcher.is_complete
        assert matcher.accept(token)
    return matcher


def test_a_valid_document_is_allowed_token_by_token_and_ends_the_grammar(compiler, tokenizer):
    text = '{"name": "Ann", "age": 41, "role": "user", "tags": ["a", "b"]}'
    matcher = walk(compiler, tokenizer, ResponseFormat.json_schema(PERSON), tokenizer.encode(text))
    assert matcher.is_complete
    assert allowed_token_ids(matcher.bitmask(), tokenizer.vocab_size).tolist() == [tokenizer.eos_token_ids[0]]

    nested = tokenizer.encode('{"x": [1, {"y": null}]}')
    matcher = walk(compiler, tokenizer, ResponseFormat.json_object(), nested)
    assert matcher.is_complete


def test_what_the_schema_forbids_is_never_allowed(compiler, tokenizer):
    matcher = walk(compiler, tokenizer, ResponseFormat.json_schema(PERSON), tokenizer.encode('{"name": "A'))
    assert not matcher.is_complete
    allowed = allowed_token_ids(matcher.bitmask(), tokenizer.vocab_size)
    assert tokenizer.eos_token_ids[0] not in allowed  # no end of sequence inside the JSON
    prefix = tokenizer.encode('{"name": "Ann", "age": 41, "role": "')
    matcher = walk(compiler, tokenizer, ResponseFormat.json_schema(PERSON), prefix)
    words = {tokenizer.decode([t]) for t in allowed_token_ids(matcher.bitmask(), tokenizer.vocab_size)}
    assert words and all(any(role.startswith(w) for role in ("admin", "user", "guest")) for w in words)
    banned = next(t for t in range(3, tokenizer.vocab_size) if tokenizer.decode([t]) == "0")
    assert not matcher.accept(banned) and matcher.error


def test_random_walks_through_the_mask_always_give_valid_json(compiler, tokenizer):
    """Any path the mask allows is valid: the property the sampler relies on, over many seeds."""
    eos = tokenizer.eos_token_ids[0]
    # PERSON bounds every string and array, so each walk ends well within 200 tokens; a json_object
    # walk that draws uniformly may nest or run on, so only most of them end.
    for response_format, schema, min_complete in ((ResponseFormat.json_schema(PERSON), PERSON, 60),
                                                  (ResponseFormat.json_object(), {"type": "object"}, 30)):
        num_complete = 0
        for seed in range(60):
            rng = np.random.default_rng(seed)
            matcher, ids = compiler.matcher(response_format), []
            for _ in range(200):
                token = int(rng.choice(allowed_token_ids(matcher.bitmask(), tokenizer.vocab_size)))
                if token == eos:
                    break
                assert matcher.accept(token)
                ids.append(token)
            if matcher.is_complete:
                num_complete += 1
                jsonschema.validate(json.loads(tokenizer.decode(ids)), schema)
        assert num_complete >= min_complete, (response_format.type, num_complete)


@pytest.mark.parametrize("schema, words", [
    ({"type": "strin"}, "strin"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum"),
    ({"not": {"type": "string"}}, "not"),
    ({"$ref": "https://example.com/schema.json"}, "example.com"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ({"type": "object", "properties": 5}, "properties"),
])
def test_schemas_that_cannot_compile_name_the_field(compiler, schema, words):
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: .*" + words):
        compiler.matcher(ResponseFormat.json_schema(schema))


def test_response_format_values_are_checked():
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: must be a JSON object"):
        ResponseFormat.json_schema("[1, 2]")
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: not valid JSON"):
        ResponseFormat.json_schema("{")
    with pytest.raises(ValueError, match=r"^response_format\.type"):
        ResponseFormat("xml")
    with pytest.raises(ValueError, match=r"^ignore_eos: cannot be true with response_format"):
        SamplingParams(ignore_eos=True, response_format=ResponseFormat.json_object())
    with pytest.raises(ValueError, match=r"^min_tokens: is not supported with response_format"):
        SamplingParams(min_tokens=2, response_format=ResponseFormat.json_object())
    with pytest.raises(ValueError, match=r"^response_format: must be a ResponseFormat"):
        SamplingParams(response_format={"type": "json_object"})


def test_matchers_of_one_schema_are_independent(compiler, tokenizer):
    first = compiler.matcher(ResponseFormat.json_schema(PERSON))
    second = compiler.matcher(ResponseFormat.json_schema(PERSON))  # from the compiled cache
    start = first.bitmask().copy()
    for token in tokenizer.encode('{"name": "B'):
        assert first.accept(token)
    np.testing.assert_array_equal(second.bitmask(), start)
    assert not np.array_equal(first.bitmask(), start)
    assert not first.bitmask().flags.writeable  # rows are immutable data


def test_ids_past_the_tokenizer_are_never_allowed(tokenizer):
    padded = tokenizer.vocab_size + 45  # a model whose embedding has spare rows
    compiler = GrammarCompiler(tokenizer.hf_tokenizer, padded, tokenizer.eos_token_ids)
    mask = compiler.matcher(ResponseFormat.json_object()).bitmask()
    assert mask.shape == (-(-padded // 32),) and mask.dtype == np.int32
    allowed = allowed_token_ids(mask, padded)
    assert len(allowed) and allowed.max() < tokenizer.vocab_size
