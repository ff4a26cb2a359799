import random

import pytest

from kvloom.engine.pages import PageAllocator
from kvloom.engine.radix_cache import NoPrefixCache, PrefixMatch, RadixCache, make_prefix_cache


@pytest.fixture(params=[1, 4, 16])
def ps(request):
    return request.param


def page(ps, sym):
    """One page of distinct token ids named by a symbol; pages named alike share all but the last token."""
    base = ord(sym[0]) * 1000
    return [base + j for j in range(ps - 1)] + [base + 999 if sym.endswith("'") else base + ps - 1]


def toks(ps, syms):
    """toks(4, "abc") -> three pages; "c'" in a list differs from "c" only in its last token."""
    return [t for s in syms for t in page(ps, s)]


def make(ps, num_pages=64):
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, ps)


def cached(cache, alloc, syms):
    """Compute and insert a sequence like a finished request would, then drop the request's refs."""
    tokens = toks(cache.page_size, syms)
    pages = alloc.allocate(len(syms))
    cache.insert(tokens, pages)
    alloc.release(pages)
    return pages


def test_match_after_insert(ps):
    alloc, cache = make(ps)
    pages = alloc.allocate(3)
    assert cache.insert(toks(ps, "abc"), pages) == 0
    assert [alloc.ref_count(p) for p in pages] == [2, 2, 2]  # caller + cache
    assert cache.num_cached_pages == 3

    m = cache.match_prefix(toks(ps, "abc"))
    assert (m.num_tokens, m.pages) == (3 * ps, pages)
    assert cache.match_prefix(toks(ps, "abcd")).pages == pages
    assert cache.match_prefix(toks(ps, "ab")).pages == pages[:2]
    assert cache.match_prefix(toks(ps, "axc")).pages == pages[:1]
    assert cache.match_prefix(toks(ps, "x")) == PrefixMatch(0, [], None)
    assert cache.match_prefix([]) == PrefixMatch(0, [], None)

    alloc.release(pages)
    assert [alloc.ref_count(p) for p in pages] == [1, 1, 1]  # the cache's own


@pytest.mark.parametrize("ps", [4, 16])
def test_partial_page_is_not_matched(ps):
    alloc, cache = make(ps)
    pages = cached(cache, alloc, "abc")
    assert cache.match_prefix(toks(ps, "ab") + page(ps, "c")[:-1]).pages == pages[:2]
    assert cache.match_prefix(toks(ps, "abc") + [1, 2]).num_tokens == 3 * ps
    # A page differing only in its last token is a different page.
    assert cache.match_prefix(toks(ps, ["a", "b", "c'"])).pages == pages[:2]
    assert cache.match_prefix(toks(ps, ["a'"])).num_tokens == 0


def test_max_tokens(ps):
    alloc, cache = make(ps)
    pages = cached(cache, alloc, "abc")
    t = toks(ps, "abc")
    assert cache.match_prefix(t, max_tokens=len(t) - 1).pages == pages[:2]
    assert cache.match_prefix(t, max_tokens=len(t)).pages == pages
    assert cache.match_prefix(t, max_tokens=100 * ps).pages == pages
    assert cache.match_prefix(t, max_tokens=2 * ps + ps // 2).pages == pages[:2]
    assert cache.match_prefix(t, max_tokens=0).num_tokens == 0
    assert cache.match_prefix(t[:ps], max_tokens=ps - 1).node is None  # a one-page prompt computes itself


def test_divergent_insert_splits_node(ps):
    alloc, cache = make(ps)
    first = cached(cache, alloc, "abcd")
    second = alloc.allocate(4)  # another request computed "ab" again, in other pages
    assert cache.insert(toks(ps, "abxy"), second) == 2 * ps
    assert [alloc.ref_count(p) for p in second] == [1, 1, 2, 2]  # no refs on duplicates
    assert cache.num_cached_pages == 6

    assert cache.match_prefix(toks(ps, "abcd")).pages == first
    assert cache.match_prefix(toks(ps, "abxy")).pages == first[:2] + second[2:]
    assert cache.match_prefix(toks(ps, "abz")).pages == first[:2]
    ((shared,),) = [list(cache._root.children.values())]
    assert shared.pages == first[:2] and len(shared.children) == 2

    # Diverging within a page (only its last token differs) splits at that page's boundary.
    third = alloc.allocate(3)
    assert cache.insert(toks(ps, ["a", "b", "c'"]), third) == 2 * ps
    assert cache.match_prefix(toks(ps, ["a", "b", "c'"])).pages == first[:2] + third[2:]
    assert cache.match_prefix(toks(ps, "abcd")).pages == first
    alloc.release(second + third)


def test_duplicate_insert_takes_no_refs(ps):
    alloc, cache = make(ps)
    first = cached(cache, alloc, "abc")
    again = alloc.allocate(3)
    assert cache.insert(toks(ps, "abc"), again) == 3 * ps
    assert cache.insert(toks(ps, "ab"), again[:2]) == 2 * ps  # a prefix of a node: no split
    assert [alloc.ref_count(p) for p in again] == [1, 1, 1]
    assert [alloc.ref_count(p) for p in first] == [1, 1, 1]
    assert cache.num_cached_pages == 3 and len(list(cache._nodes())) == 1
    assert cache.insert([], []) == 0
    with pytest.raises(ValueError):
        cache.insert(toks(ps, "ab")[:-1], again[:2])
    alloc.release(again)


def test_lock_protects_node_and_ancestors(ps):
    alloc, cache = make(ps)
    abc = cached(cache, alloc, "abc")
    abd = cached(cache, alloc, "abd")  # tree: ab -> {c, d}
    m = cache.match_prefix(toks(ps, "abc"))
    cache.lock(m.node)
    cache.lock(m.node)  # locks nest
    assert cache.num_evictable_pages == 1
    assert cache.evict(100) == 1  # only the unlocked leaf d
    assert alloc.ref_count(abd[2]) == 0
    assert cache.match_prefix(toks(ps, "abc")).pages == abc
    cache.unlock(m.node)
    assert cache.evict(100) == 0
    cache.unlock(m.node)
    with pytest.raises(ValueError):
        cache.unlock(m.node)
    assert cache.num_evictable_pages == 3
    assert cache.evict(100) == 3
    assert cache.num_cached_pages == 0 and alloc.num_used_pages == 0


def test_lock_of_partial_match_survives_a_later_split(ps):
    alloc, cache = make(ps)
    pages = cached(cache, alloc, "abcd")
    m = cache.match_prefix(toks(ps, "abx"))  # matches 2 pages of the 4-page node
    assert m.pages == pages[:2]
    cache.lock(m.node)
    cached(cache, alloc, "az")  # splits the node above the match
    assert cache.evict(100) == 1  # only z
    assert cache.match_prefix(toks(ps, "abcd")).pages == pages
    cache.unlock(m.node)
    assert cache.evict(100) == 4


def test_evict_least_recently_used_leaf_first(ps):
    alloc, cache = make(ps)
    a = cached(cache, alloc, "a")
    b = cached(cache, alloc, "b")
    c = cached(cache, alloc, "c")
    cache.match_prefix(toks(ps, "a"))  # a is now the most recent
    assert cache.evict(1) == 1 and alloc.ref_count(b[0]) == 0
    assert cache.evict(1) == 1 and alloc.ref_count(c[0]) == 0
    assert cache.match_prefix(toks(ps, "a")).pages == a


def test_evict_cascades_to_parents_and_trims_tails(ps):
    alloc, cache = make(ps)
    cached(cache, alloc, "abc")
    cached(cache, alloc, "abd")
    cached(cache, alloc, "x")
    cache.match_prefix(toks(ps, "x"))  # x most recent: ab goes before it once c and d are gone
    assert cache.evict(4) == 4
    assert cache.num_cached_pages == 1 and cache.match_prefix(toks(ps, "x")).num_tokens == ps

    long = cached(cache, alloc, "pqrs")
    cache.match_prefix(toks(ps, "x"))
    assert cache.evict(2) == 2  # the tail of the older leaf; its prefix stays
    assert cache.match_prefix(toks(ps, "pqrs")).pages == long[:2]
    assert [alloc.ref_count(p) for p in long] == [1, 1, 0, 0]
    assert cache.evict(0) == 0


def test_evict_drops_refs_but_not_pages_a_request_holds(ps):
    alloc, cache = make(ps)
    pages = alloc.allocate(2)
    cache.insert(toks(ps, "ab"), pages)
    assert cache.evict(10) == 2
    assert [alloc.ref_count(p) for p in pages] == [1, 1]  # still the request's
    alloc.release(pages)
    assert alloc.num_used_pages == 0


def test_reset_releases_everything_and_stales_handles(ps):
    alloc, cache = make(ps)
    held = alloc.allocate(3)
    cache.insert(toks(ps, "abc"), held)
    cached(cache, alloc, "abd")
    m = cache.match_prefix(toks(ps, "abc"))
    cache.lock(m.node)
    cache.reset()
    assert cache.num_cached_pages == 0 and cache.num_evictable_pages == 0
    assert cache.match_prefix(toks(ps, "abc")).num_tokens == 0
    cache.unlock(m.node)  # a request torn down after the reset: ignored
    with pytest.raises(ValueError):
        cache.lock(m.node)
    alloc.release(held)
    assert all(alloc.ref_count(p) == 0 for p in range(alloc.num_pages))
    assert alloc.num_free_pages == alloc.num_usable_pages


def test_stats_and_hit_rate(ps):
    alloc, cache = make(ps)
    assert cache.hit_rate == 0.0
    cached(cache, alloc, "ab")
    cache.match_prefix(toks(ps, "abcd"))  # 2 of 4 pages
    cache.match_prefix(toks(ps, "xy"))  # miss
    assert (cache.num_queries, cache.num_hits) == (2, 1)
    assert (cache.num_query_tokens, cache.num_hit_tokens) == (6 * ps, 2 * ps)
    assert cache.hit_rate == pytest.approx(1 / 3)


def test_no_prefix_cache(ps):
    alloc = PageAllocator(8)
    cache = make_prefix_cache(alloc, ps, enabled=False)
    assert isinstance(cache, NoPrefixCache)
    assert isinstance(make_prefix_cache(alloc, ps, enabled=True), RadixCache)
    pages = alloc.allocate(2)
    assert cache.insert(toks(ps, "ab"), pages) == 0
    assert [alloc.ref_count(p) for p in pages] == [1, 1]
    m = cache.match_prefix(toks(ps, "ab"))
    assert m == PrefixMatch(0, [], None)
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.evict(10) == 0 and cache.num_cached_pages == 0 and cache.num_evictable_pages == 0
    cache.reset()
    assert (cache.num_queries, cache.num_query_tokens, cache.num_hits, cache.hit_rate) == (1, 2 * ps, 0, 0.0)
    with pytest.raises(ValueError):
        cache.insert([1], [])


def test_bad_page_size():
    with pytest.raises(ValueError):
        RadixCache(PageAllocator(4), 0)


# --- randomized property test against a reference model ---------------------------------------------


def tree_prefixes(cache):
    """Every cached whole-page prefix -> the page holding its last page of tokens (white box)."""
    ps, out, stack = cache.page_size, {}, [(cache._root, ())]
    while stack:
        node, prefix = stack.pop()
        for i, p in enumerate(node.pages):
            out[prefix + node.tokens[: (i + 1) * ps]] = p
        stack.extend((child, prefix + node.tokens) for child in node.children.values())
    return out


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ops_against_reference_model(ps, seed):
    rng = random.Random(seed)
    alloc = PageAllocator(40)
    cache = RadixCache(alloc, ps)
    model = {}  # cached prefix (tuple of whole pages of tokens) -> page holding its last page
    page_tokens = {}  # page -> the tokens its allocating request wrote there
    active = []  # (tokens, pages, match) of admitted requests
    bases = [[rng.randrange(3) for _ in range(6 * ps)] for _ in range(3)]

    def random_tokens():
        base = rng.choice(bases)
        tail = [rng.randrange(3) for _ in range(rng.randrange(2 * ps))]
        return base[: rng.randrange(1, len(base) + 1)] + tail

    def expected(tokens, limit):
        pages = []
        while (len(pages) + 1) * ps <= limit and tuple(tokens[: (len(pages) + 1) * ps]) in model:
            pages.append(model[tuple(tokens[: (len(pages) + 1) * ps])])
        return len(pages) * ps, pages

    def check():
        assert tree_prefixes(cache) == model
        assert cache.num_cached_pages == len(model)
        cached_pages = set(model.values())
        for p in range(1, alloc.num_pages):
            holders = (p in cached_pages) + sum(p in pages for _, pages, _ in active)
            assert alloc.ref_count(p) == holders, p
        assert alloc.num_used_pages == sum(alloc.ref_count(p) > 0 for p in range(alloc.num_pages))
        locked = {p for _, _, m in active for p in m.pages}
        assert cache.num_evictable_pages <= len(model) - len(locked)

    def evict(n):
        nonlocal model
        evictable = cache.num_evictable_pages
        dropped = cache.evict(n)
        assert dropped == min(n, evictable)
        after = tree_prefixes(cache)
        assert all(model.get(k) == v for k, v in after.items())  # only removals
        assert len(model) - len(after) == dropped
        for tokens, _, m in active:  # locked prefixes survive
            assert expected(tokens, m.num_tokens) == (m.num_tokens, m.pages)
        model = after
        return dropped

    for _ in range(300):
        op = rng.choices(["admit", "finish", "query", "evict"], weights=[3, 2, 2, 1])[0]
        if op == "admit":
            tokens = random_tokens()
            m = cache.match_prefix(tokens, max_tokens=len(tokens) - 1)
            assert (m.num_tokens, m.pages) == expected(tokens, len(tokens) - 1)
            assert m.num_tokens < len(tokens)
            for i, p in enumerate(m.pages):
                assert page_tokens[p] == tokens[i * ps:(i + 1) * ps]
            cache.lock(m.node)
            alloc.incref(m.pages)
            need = -(-len(tokens) // ps) - len(m.pages)
            if not alloc.can_allocate(need):
                evict(need - alloc.num_free_pages)
            if not alloc.can_allocate(need):
                cache.unlock(m.node)
                alloc.release(m.pages)
                continue
            fresh = alloc.allocate(need)
            for j, p in enumerate(fresh, start=len(m.pages)):
                page_tokens[p] = tokens[j * ps:(j + 1) * ps]
            active.append((tokens, m.pages + fresh, m))
        elif op == "finish" and active:
            tokens, pages, m = active.pop(rng.randrange(len(active)))
            n = len(tokens) // ps
            assert cache.insert(tokens[: n * ps], pages[:n]) == expected(tokens, n * ps)[0]
            for k in range(n):
                model.setdefault(tuple(tokens[: (k + 1) * ps]), pages[k])
            cache.unlock(m.node)
            alloc.release(pages)
        elif op == "query":
            tokens = random_tokens()
            limit = rng.choice([None, rng.randrange(len(tokens) + 1)])
            m = cache.match_prefix(tokens, max_tokens=limit)
            assert (m.num_tokens, m.pages) == expected(tokens, len(tokens) if limit is None else limit)
        elif op == "evict":
            evict(rng.randrange(8))
        check()

    assert cache.num_queries > 0 and 0.0 < cache.hit_rate < 1.0
    while active:
        tokens, pages, m = active.pop()
        cache.unlock(m.node)
        alloc.release(pages)
    assert cache.num_evictable_pages == cache.num_cached_pages
    cache.reset()
    model = {}
    check()
    assert alloc.num_free_pages == alloc.num_usable_pages
