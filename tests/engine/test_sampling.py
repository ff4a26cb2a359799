"""The jitted sampler on hand-made logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvloom.engine.sampling import (SamplingInput, apply_logit_bias, apply_penalties, argmax_rows,
                                   rows_finite, sample)

V = 600  # more than the 256 candidates, so the wide-nucleus path is reachable
_sample = jax.jit(sample)


def make_input(n, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, freq=0.0, pres=0.0,
               seeds=None, counters=None, prompt_ids=None, output_ids=None, logprobs=False, bias=None,
               bitmask=None):
    """bias: per row, a list of (token id, bias) entries (-inf bans the token); bitmask: [n, ceil(V / 32)]
    int32 allowed tokens (None: all)."""
    full = lambda v, dt=np.float32: np.full(n, v, dt)  # noqa: E731
    pad = np.full((n, 8), -1, np.int32)
    bias_ids, bias_values = np.full((n, 6), -1, np.int32), np.zeros((n, 6), np.float32)
    for i, entries in enumerate(bias or []):
        for j, (token, value) in enumerate(entries):
            bias_ids[i, j], bias_values[i, j] = token, value
    return SamplingInput(
        temperature=full(temperature), top_k=full(top_k, np.int32), top_p=full(top_p), min_p=full(min_p),
        repetition_penalty=full(rep), frequency_penalty=full(freq), presence_penalty=full(pres),
        seeds=np.arange(n, dtype=np.uint32) if seeds is None else np.asarray(seeds, np.uint32),
        counters=np.zeros(n, np.int32) if counters is None else np.asarray(counters, np.int32),
        prompt_ids=pad if prompt_ids is None else prompt_ids,
        output_ids=pad if output_ids is None else output_ids,
        bias_ids=bias_ids, bias_values=bias_values,
        token_bitmask=np.full((n, -(-V // 32)), -1, np.int32) if bitmask is None else bitmask,
        any_sampled=np.bool_(temperature > 0), any_penalties=np.bool_(rep != 1.0 or freq or pres),
        any_logprobs=np.bool_(logprobs), any_bias=np.bool_((bias_ids >= 0).any()),
        any_bitmask=np.bool_(bitmask is not None),
    )


@pytest.mark.parametrize("vocab", [7, 512, 600, 1024, 49152])
def test_blocked_argmax_is_numpy_argmax_ties_included(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((6, vocab)).astype(np.float32)
    x[1, :] = 0.0  # all tied: the first index
    x[2, [3 % vocab, vocab - 1]] = 50.0  # a tie across blocks: the first
    x[3, vocab - 1] = 60.0  # the maximum in the (padded) last block
    x[4, :] = -np.inf
    x[4, vocab // 2] = -1e30
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax_rows)(x)), x.argmax(-1))


def test_rows_finite_catches_nan_and_both_infinities():
    x = np.zeros((4, 700), np.float32)
    x[1, 650], x[2, 3], x[3, 400] = np.nan, np.inf, -np.inf
    assert np.asarray(jax.jit(rows_finite)(x)).tolist() == [True, False, False, False]


def draws(logits_row, n=4000, **kw):
    logits = np.tile(np.asarray(logits_row, np.float32), (n, 1))
    out = _sample(logits, make_input(n, **kw))
    return np.asarray(out.token_ids)


def test_greedy_is_argmax_and_logprobs():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, V)).astype(np.float32)
    out = _sample(logits, make_input(4, temperature=0.0, logprobs=True))
    assert np.array_equal(np.asarray(out.token_ids), logits.argmax(-1))
    ref = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(np.asarray(out.logprobs), ref.max(-1), rtol=1e-5)
    top = np.asarray(out.top_logprobs)
    assert np.all(np.diff(top, axis=-1) <= 0)
    np.testing.assert_array_equal(np.asarray(out.top_ids)[:, 0], logits.argmax(-1))


def test_distribution_follows_softmax():
    logits = np.full(V, -20.0, np.float32)
    logits[[5, 6, 7]] = np.log([0.5, 0.3, 0.2])
    counts = np.bincount(draws(logits), minlength=V)
    assert counts[[5, 6, 7]].sum() == 4000
    np.testing.assert_allclose(counts[[5, 6, 7]] / 4000, [0.5, 0.3, 0.2], atol=0.03)


def test_top_k_top_p_min_p():
    logits = np.full(V, -30.0, np.float32)
    logits[[10, 11, 12, 13]] = np.log([0.4, 0.3, 0.2, 0.1])
    assert set(draws(logits, top_k=2)) == {10, 11}
    assert set(draws(logits, top_p=0.65)) == {10, 11}  # 0.4 < 0.65, 0.7 >= 0.65: the crossing token stays
    assert set(draws(logits, min_p=0.6)) == {10, 11}  # p >= 0.6 * 0.4
    assert set(draws(logits, top_k=1)) == {10}


def test_top_p_wider_than_the_candidates_is_exact():
    logits = np.linspace(0.0, -3.0, V).astype(np.float32)  # a flat tail: the 0.9 nucleus is ~430 tokens
    probs = np.exp(logits) / np.exp(logits).sum()
    cutoff = int(np.searchsorted(np.cumsum(probs), 0.9))  # the last token inside the nucleus
    assert cutoff > 256
    seen = draws(logits, n=8000, top_p=0.9)
    assert cutoff - 20 < seen.max() <= cutoff


def test_seed_and_counter_decide_the_draw():
    logits = np.zeros((3, V), np.float32)
    a = np.asarray(_sample(logits, make_input(3, seeds=[7, 7, 8], counters=[0, 0, 0])).token_ids)
    b = np.asarray(_sample(logits[:1], make_input(1, seeds=[7], counters=[0])).token_ids)
    c = np.asarray(_sample(logits[:1], make_input(1, seeds=[7], counters=[1])).token_ids)
    assert a[0] == a[1] == b[0]
    assert a[2] != a[0] or c[0] != b[0]


@pytest.mark.parametrize("rep,freq,pres", [(2.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 1.0)])
def test_penalties(rep, freq, pres):
    logits = jnp.asarray(np.array([[2.0, -2.0, 1.0, 0.5]], np.float32))
    prompt = np.array([[1, -1, -1]], np.int32)
    output = np.array([[0, 0, -1]], np.int32)
    inp = make_input(1, rep=rep, freq=freq, pres=pres, prompt_ids=prompt, output_ids=output)
    got = np.asarray(apply_penalties(logits, inp))[0]
    want = np.array([2.0, -2.0, 1.0, 0.5])
    seen = [0, 1]
    for t in seen:  # repetition: prompt and output tokens
        want[t] = want[t] / rep if want[t] > 0 else want[t] * rep
    want[0] -= freq * 2 + pres  # frequency and presence: output tokens only
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gumbel_noise_is_finite_gumbel_and_row_local():
    from kvloom.engine.sampling import gumbel_noise

    seeds = np.arange(2000, dtype=np.uint32)
    noise = np.asarray(jax.jit(lambda s, c: gumbel_noise(s, c, 600))(seeds, np.zeros(2000, np.int32)))
    assert np.isfinite(noise).all()
    assert abs(noise.mean() - 0.5772) < 0.01 and abs(noise.std() - np.pi / np.sqrt(6)) < 0.01
    alone = np.asarray(gumbel_noise(seeds[7:8], np.zeros(1, np.int32), 600))
    np.testing.assert_array_equal(alone[0], noise[7])  # a row's noise depends on its own seed only


def test_logit_bias_adds_and_bans_per_row():
    logits = jnp.asarray(np.array([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]], np.float32))
    inp = make_input(2, bias=[[(1, 5.0), (2, -0.5)], [(0, -np.inf)]])
    got = np.asarray(apply_logit_bias(logits, inp))
    np.testing.assert_allclose(got[0], [2.0, 3.0, 0.5, 0.5])
    np.testing.assert_allclose(got[1, 1:], [-2.0, 1.0, 0.5])
    assert got[1, 0] <= -1e29 and np.isfinite(got[1, 0])


def test_logit_bias_steers_greedy_and_sampled_draws_but_not_logprobs():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, V)).astype(np.float32)
    best = logits.argmax(-1)
    inp = make_input(2, temperature=0.0, logprobs=True, bias=[[(17, 100.0)], [(int(best[1]), -100.0)]])
    out = _sample(logits, inp)
    tokens = np.asarray(out.token_ids)
    assert tokens[0] == 17
    assert tokens[1] == np.argsort(-logits[1])[1]  # the runner-up once the best is pushed down
    ref = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(np.asarray(out.logprobs), ref[[0, 1], tokens], rtol=1e-5)  # raw distribution
    row = np.full(V, -20.0, np.float32)
    row[[5, 6]] = 0.0
    banned = draws(row, n=500, bias=[[(5, -np.inf)]] * 500)
    assert set(banned) == {6}


def packed(allowed_rows) -> np.ndarray:
    """Per row, the set of allowed token ids (None: all) -> the packed int32 bitmask [n, ceil(V / 32)]."""
    bits = np.zeros((len(allowed_rows), -(-V // 32) * 32), np.uint8)
    for i, allowed in enumerate(allowed_rows):
        bits[i, list(range(V)) if allowed is None else sorted(allowed)] = 1
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32)


def test_token_bitmask_unpacks_bit_j_of_word_w_as_token_32w_plus_j():
    from kvloom.engine.sampling import apply_token_bitmask

    rng = np.random.default_rng(5)
    allowed = [set(rng.choice(V, size=k, replace=False).tolist()) for k in (1, 31, 32, 33, 599)] + [None]
    logits = rng.standard_normal((len(allowed), V)).astype(np.float32)
    got = np.asarray(jax.jit(apply_token_bitmask)(logits, packed(allowed)))
    for i, row in enumerate(allowed):
        keep = np.zeros(V, bool)
        keep[list(range(V)) if row is None else sorted(row)] = True
        np.testing.assert_array_equal(got[i, keep], logits[i, keep])
        assert (got[i, ~keep] <= -1e29).all() and np.isfinite(got[i]).all()


def test_token_bitmask_constrains_greedy_rows_and_leaves_unconstrained_rows_alone():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, V)).astype(np.float32)
    allowed = [{3, 64, 599}, set(range(500, 600)), None, None]
    out = _sample(logits, make_input(4, temperature=0.0, logprobs=True, bitmask=packed(allowed)))
    plain = _sample(logits, make_input(4, temperature=0.0, logprobs=True))
    tokens = np.asarray(out.token_ids)
    for i in (0, 1):
        assert tokens[i] == max(allowed[i], key=lambda t: logits[i, t])
    np.testing.assert_array_equal(tokens[2:], np.asarray(plain.token_ids)[2:])
    ref = np.asarray(jax.nn.log_softmax(logits))
    raw = ref[np.arange(4), tokens]
    np.testing.assert_allclose(np.asarray(out.logprobs), raw, rtol=1e-5)  # of the raw distribution


def test_token_bitmask_wins_over_bias_and_keeps_the_allowed_distribution():
    logits = np.linspace(0.0, -3.0, V).astype(np.float32)  # a wide nucleus: the exact top-p path runs
    allowed = set(range(0, V, 2))  # even ids only
    n = 4000
    seen = draws(logits, n=n, top_p=0.999, bias=[[(1, 100.0)]] * n, bitmask=packed([allowed] * n))
    assert set(seen.tolist()) <= allowed
    probs = np.exp(logits[::2]) / np.exp(logits[::2]).sum()  # the softmax over the allowed tokens
    counts = np.bincount(seen // 2, minlength=len(probs))
    first_half = counts[:len(probs) // 2].sum() / n
    assert abs(first_half - probs[:len(probs) // 2].sum()) < 0.03
