"""The host side of the paged KV cache: which pages are free, who holds each page, and forks.

A sequence owns a list of pages (its page table); token t of it lives in page `table[t // page_size]`.
Pages are reference-counted so that forks share them: `fork` gives a child the parent's full pages
(shared, read-only from then on) and a fresh copy of its last, partly filled page (copy-on-write: the
child will append into it). Every page goes back to the free list exactly once, when its last holder
releases it; a release of a page nobody holds is an error, never a silent double free.
"""
from __future__ import annotations

import dataclasses


class OutOfPages(RuntimeError):
    """Not enough free pages for a request; nothing was allocated (the engine queues the request)."""


def pages_needed(length: int, page_size: int) -> int:
    return -(-int(length) // page_size)


@dataclasses.dataclass
class Fork:
    """A child's page table, and the (source, destination) pages the device must copy before the
    child writes (its copy of the parent's last partial page)."""

    pages: list[int]
    copies: list[tuple[int, int]]


class PagePool:
    """`num_pages` pages of `page_size` tokens: allocation, sharing and release, on the host."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PagePool: num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._refs = [0] * num_pages

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages (reference count 1); OutOfPages, allocating nothing, when fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"{n} pages needed, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] < 1:
                raise ValueError(f"PagePool: page {p} is free; only a held page can be shared")
            self._refs[p] += 1

    def release(self, pages: list[int]) -> list[int]:
        """Drop one reference to each page; returns the pages this freed (back on the free list)."""
        freed = []
        for p in pages:
            if self._refs[p] < 1:
                raise ValueError(f"PagePool: page {p} released but not held (double free)")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
                freed.append(p)
        return freed

    def grow(self, pages: list[int], new_length: int) -> list[int]:
        """Pages appended to a sequence's table (in place, and returned) for it to hold `new_length` tokens."""
        extra = pages_needed(new_length, self.page_size) - len(pages)
        added = self.allocate(extra) if extra > 0 else []
        pages.extend(added)
        return added

    def fork(self, pages: list[int], length: int, private_from: int | None = None) -> Fork:
        """A child of a sequence of `length` tokens held in `pages`: the full pages shared, the last
        partial one (if any) copied into a fresh page. OutOfPages (nothing changed) if none is free.
        `private_from`: the first token index either sequence may still write (default `length`; less when
        another stream sharing the table, such as a compacted MTP stream, is shorter): its page on is copied."""
        used = pages[:pages_needed(length, self.page_size)]
        full = min(length, length if private_from is None else private_from) // self.page_size
        shared, partial = used[:full], used[full:]
        fresh = self.allocate(len(partial))
        self.retain(shared)
        return Fork(shared + fresh, list(zip(partial, fresh)))
