import pytest

from kvloom.engine.pages import OutOfPagesError, PageAllocator


def test_needs_at_least_two_pages():
    with pytest.raises(ValueError):
        PageAllocator(1)
    assert PageAllocator(2).num_usable_pages == 1


def test_page_zero_is_never_handed_out():
    alloc = PageAllocator(8)
    pages = alloc.allocate(7)
    assert sorted(pages) == list(range(1, 8))
    assert 0 not in pages
    assert alloc.num_free_pages == 0 and alloc.num_used_pages == 7
    alloc.release(pages)
    # Round-trip again: freed pages come back, page 0 still never does.
    assert 0 not in alloc.allocate(7)


def test_allocate_is_all_or_nothing():
    alloc = PageAllocator(5)  # 4 usable
    first = alloc.allocate(3)
    assert alloc.can_allocate(1) and not alloc.can_allocate(2)
    with pytest.raises(OutOfPagesError, match=r"wanted 2.*1 free"):
        alloc.allocate(2)
    assert alloc.num_free_pages == 1 and alloc.num_used_pages == 3
    assert alloc.allocate(0) == []
    (last,) = alloc.allocate(1)
    assert last not in first
    with pytest.raises(ValueError):
        alloc.allocate(-1)


def test_ref_counting():
    alloc = PageAllocator(4)
    a, b = alloc.allocate(2)
    assert alloc.ref_count(a) == alloc.ref_count(b) == 1
    alloc.incref([a, a, b])
    assert alloc.ref_count(a) == 3 and alloc.ref_count(b) == 2
    alloc.release([a, b])
    alloc.release([a])
    assert alloc.num_free_pages == 1  # neither is free yet
    alloc.release([a, b])
    assert alloc.ref_count(a) == alloc.ref_count(b) == 0
    assert alloc.num_free_pages == 3 and alloc.num_used_pages == 0


def test_double_free_and_bad_pages_are_caught():
    alloc = PageAllocator(4)
    (a,) = alloc.allocate(1)
    alloc.release([a])
    with pytest.raises(ValueError, match="double free"):
        alloc.release([a])
    with pytest.raises(ValueError):
        alloc.release([0])
    with pytest.raises(ValueError):
        alloc.release([99])
    with pytest.raises(ValueError):
        alloc.incref([a])  # free pages cannot be shared
    with pytest.raises(ValueError):
        alloc.incref([0])
    assert alloc.num_free_pages == 3


def test_failed_release_changes_nothing():
    alloc = PageAllocator(4)
    a, b = alloc.allocate(2)
    with pytest.raises(ValueError):
        alloc.release([a, b, b])  # b only has one reference
    assert alloc.ref_count(a) == alloc.ref_count(b) == 1
    assert alloc.num_free_pages == 1
    with pytest.raises(ValueError):
        alloc.incref([a, 3])  # 3 is free
    assert alloc.ref_count(a) == 1
