"""The generation engine: a host scheduler with continuous batching over the paged cache.

    engine = Engine(model, max_slots=64, max_seq_len=4096, tokenizer=tokenizer)
    rid = engine.submit(Request(tokens, images, n=8, sampling=Sampling(temperature=1.0), on_done=cb))
    rid = engine.submit(Request(messages=[{"role": "user", "content": [{"type": "image", "image": png},
                                                                     "What is in the image?"]}]))
    engine.run()              # or engine.step() from a loop of your own; cb(Completion) as requests finish

A request waits in a FIFO queue until its n samples have free slots and the pages of the whole turn
(prompt + max_new_tokens, at most `max_seq_len`) are free: a request that does not fit yet waits, it never
fails or evicts another. Once admitted, its prompt is extended in chunks (batched with the other admitted
prompts, CogViT and the projector once per image), its n-1 other samples fork the prompt's pages
(copy-on-write of the last partial page), and every slot decodes `steps` tokens per device call; a slot
that finishes is refilled at the next call. Shapes are bucketed (prompt chunks to powers of two, images
to powers of two, the decode page-table width to powers of two), so after the buckets have been seen
nothing compiles, whatever the requests, their sampling parameters or the weights.

`extend(id, tokens | messages=...)` continues a conversation held with `Request(keep=True)`; `abort(ids)` returns the
partial samples; `update_weights(model, version)` stamps later tokens with `version`; `metrics()`.
The engine is thread-safe (one lock): an RL pipeline may submit and abort from other threads while one
thread runs it.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import threading
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

from glm5v_jax.generate import chat, decode, speculative
from glm5v_jax.generate.kv_cache import StackCache, cache_sharding
from glm5v_jax.generate.pages import PagePool, pages_needed
from glm5v_jax.generate.requests import (IMAGE_DTYPES, IMAGE_KEYS, Completion, Request, Sample, check_images, chunks,
                                         pad_images, pow2)
from glm5v_jax.generate.sampling import sampling_params
from glm5v_jax.models.mmtp import MMTPMode, stack_name, stream_keep


def _put(x: np.ndarray) -> jax.Array:
    """Host array to device. (Not `jnp.asarray`: on some jax versions that compiles a copy per new shape.)"""
    return jax.device_put(x)



class _Seq:
    """One sample on the engine: its pages, cache length, M-RoPE offset, slot and output so far."""

    def __init__(self, job: "_Job", index: int):
        self.job, self.index = job, index
        self.sample = Sample()
        self.first: tuple[int, float, float] | None = None  # the token sampled after the prompt
        self.draft: dict[str, np.ndarray] | None = None  # speculation: MTP entries waiting (`speculative.Draft`)
        self.pages: list[int] = []
        self.length = self.offset = self.count = self.limit = 0
        self.slot: int | None = None


class _Job:
    """A request on the engine, one turn at a time: queued -> running -> held (keep) | done.

    With `Engine(admit_partial=True)` a fresh request may be admitted in parts: each part is a `_Job` whose
    `seqs` are some of the request's samples (their own prefill, their own slots) and whose `owner` is the
    request's record (all samples: what completes, aborts and frees). Unsplit, a job is its own owner."""

    def __init__(self, rid: int, request: Request, seed: int):
        self.id, self.request, self.seed = rid, request, seed
        self.seqs = [_Seq(self, i) for i in range(request.n)]
        self.owner = self
        self.state = "queued"
        self.new_tokens = np.asarray(request.tokens, np.int32)  # this turn's tokens to append
        self.new_images = request.images
        self.budget = request.max_new_tokens
        self.stop = list(request.stop)
        self.prompt_length = len(self.new_tokens)
        self.copies: list[tuple[int, int]] = []

    def split(self, k: int) -> tuple["_Job", "_Job"]:
        """Two parts of this fresh (never prefilled) job: its first k samples and the rest."""
        parts = []
        for seqs in (self.seqs[:k], self.seqs[k:]):
            part = copy.copy(self)
            part.seqs, part.copies = seqs, []
            parts.append(part)
        return parts[0], parts[1]


class Engine:
    """Continuous batching of requests over `max_slots` decode slots and a pool of `num_pages` pages."""

    def __init__(self, model: nnx.Module, *, max_slots: int = 8, max_seq_len: int = 512, page_size: int = 16,
                 num_pages: int | None = None, prefill_rows: int = 4, max_chunk: int = 256, min_chunk: int = 16,
                 steps: int = 8, max_stop_ids: int = 4, mesh: jax.sharding.Mesh | None = None, speculate: int = 0,
                 record_routing: bool = False, decode_row_buckets: int = 3, tokenizer: Any = None,
                 admit_lookahead: int = 0, admit_partial: bool = False):
        self.graphdef, self.state = nnx.split(model)
        self.spec = model.spec
        backbone = self.spec.backbone
        if speculate and model.mtp is None:
            raise ValueError("Engine: speculate needs a model with MTP depths (spec.mtp.num_depths >= 1)")
        self.speculate = speculate  # drafts per round; then `steps` counts rounds
        self.record_routing = record_routing  # samples carry each fed token's routed experts
        # decode runs the live slots packed into the smallest of these row counts that holds them, so a
        # draining batch (few long requests left) stops paying for empty slots
        self.decode_rows = sorted({max(1, max_slots >> i) for i in range(max(1, decode_row_buckets))})
        self.max_slots, self.page_size, self.steps = max_slots, page_size, steps
        self.prefill_rows, self.max_chunk = prefill_rows, pow2(max_chunk)
        self.min_chunk = min(pow2(min_chunk), self.max_chunk)
        self.max_stop_ids = max_stop_ids
        self.pages_per_seq = pages_needed(max_seq_len + speculate, page_size)  # a verify writes k past the end
        self.capacity = max_seq_len  # tokens a sequence may hold
        self.pool = PagePool(num_pages or max_slots * self.pages_per_seq, page_size)
        mtp_stacks = {stack_name(i) for i in range(self.spec.mtp.num_depths)}
        stacks = {name: StackCache(k, backbone.num_kv_heads, backbone.head_dim)
                  for name, k in model.cache_stacks().items() if speculate or name not in mtp_stacks}
        self.cache = {name: st.init(self.pool.num_pages, page_size, backbone.dtype) for name, st in stacks.items()}
        self.mesh = mesh
        if mesh is not None:
            self.cache = jax.device_put(self.cache, cache_sharding(mesh, backbone.num_kv_heads))
        self.banned = (self.spec.image_token_id,)  # an <|image|> placeholder needs an image: never sampled
        self.tokenizer = tokenizer  # renders `Request.messages` (`chat.render_messages`)
        # admission is FIFO; with admit_lookahead = k, while the head waits (a group needs more free slots or
        # pages than there are) up to k requests behind it that fit go first, so freed slots do not idle
        self.admit_lookahead = admit_lookahead
        # with admit_partial, a fresh group that waits for slots takes the free ones now with some of its samples
        # (the rest wait at the head of the queue): no slot idles behind a group, at the cost of one more prefill
        # of its prompt per part; each sample keeps its own random stream, so its tokens are the same
        self.admit_partial = admit_partial
        self.version = 0
        self._slot_seq: list[tuple[_Job, _Seq] | None] = [None] * max_slots
        self._queue: collections.deque[_Job] = collections.deque()
        self._jobs: dict[int, _Job] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._metrics = collections.Counter()

    # ---------------------------------------------------------------- requests in
    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. ValueError (naming the field) for a request that could never run."""
        with self._lock:
            rid = self._next_id
            if request.messages is not None:
                if len(request.tokens) or request.images is not None:
                    raise ValueError(f"request {rid}: give messages or tokens and images, not both")
                tokens, images = self._render(request.messages, what=f"request {rid}", start=True)
                request = dataclasses.replace(request, tokens=tokens, images=images)
            seed = request.sampling.seed if request.sampling.seed is not None else rid * 1_000_003
            job = _Job(rid, request, seed)
            self._check(job, what=f"request {rid}")
            self._next_id += 1
            self._jobs[rid] = job
            self._queue.append(job)
            self._metrics["requests"] += 1
            return rid

    def extend(self, rid: int, tokens=(), images: dict | None = None, *, messages=None,
               max_new_tokens: int | None = None, stop=None) -> None:
        """Continue held request `rid` (submitted with keep=True, its last turn finished): its last token and
        `tokens` (a tool result, the next user turn, with `<|image|>` blocks for `images`), or `messages`
        rendered as a continuation, are appended to its cache and it generates again; on_done is called
        with the whole conversation's samples."""
        with self._lock:
            job = self._job(rid)
            if job.state != "held":
                raise ValueError(f"request {rid} is {job.state}; only a held request (keep=True, finished) "
                                 "can be extended")
            seq = job.seqs[0]
            if messages is not None:
                if len(tokens) or images is not None:
                    raise ValueError(f"extend of request {rid}: give messages or tokens and images, not both")
                tokens, images = self._render(messages, what=f"extend of request {rid}", start=False,
                                              after=seq.sample.tokens[-1])
            job.new_tokens = np.asarray([seq.sample.tokens[-1], *tokens], np.int32)
            job.new_images = images
            job.budget = max_new_tokens or job.request.max_new_tokens
            seq.count = 0
            job.stop = list(job.stop if stop is None else stop)
            self._check(job, what=f"extend of request {rid}")
            job.state = "queued"
            seq.sample.finish = None
            self._queue.append(job)

    def release(self, rid: int) -> None:
        """Free the cache of held request `rid`."""
        with self._lock:
            job = self._job(rid)
            if job.state != "held":
                raise ValueError(f"request {rid} is {job.state}, not held")
            self._drop(job)

    def abort(self, ids: Iterable[int]) -> list[Completion]:
        """Stop requests now: their partial samples (tokens, logprobs, remaining budget, finish "abort"), and
        their slots and pages freed. on_done is not called for them. KeyError for an unknown id."""
        with self._lock:
            jobs = [self._job(rid) for rid in ids]
            out = []
            for job in jobs:
                if job.state == "done":
                    continue
                if any(part.owner is job for part in self._queue):
                    self._queue = collections.deque(part for part in self._queue if part.owner is not job)
                for seq in job.seqs:
                    if seq.sample.finish is None:
                        self._end(seq, "abort")
                self._drop(job)
                self._metrics["aborted"] += 1
                out.append(self._completion(job))
            return out

    def update_weights(self, model: nnx.Module | nnx.State, version: int) -> None:
        """New weights (same structure, shapes and dtypes) for every later step; their tokens carry
        `version`. Compiles nothing."""
        state = model if isinstance(model, nnx.State) else nnx.split(model)[1]
        old = jax.tree.map(lambda x: (x.shape, x.dtype), self.state)
        new = jax.tree.map(lambda x: (x.shape, x.dtype), state)
        if jax.tree.structure(old) != jax.tree.structure(new) or jax.tree.leaves(old) != jax.tree.leaves(new):
            raise ValueError("update_weights: the new weights differ from the engine's in structure, shape or dtype")
        with self._lock:
            self.state, self.version = state, int(version)

    # ---------------------------------------------------------------- running
    def warmup(self, max_images: int = 0) -> int:
        """Compile every shape the engine can meet now (prompt chunks up to `max_images` images each,
        every decode page-table width), so that serving compiles nothing. Writes nothing into the cache.
        Returns the number of shapes run."""
        with self._lock:
            r, v = self.prefill_rows, self.spec.vision
            width, shapes = self.pages_per_seq, 0
            image_counts = [0] + [1 << i for i in range(pow2(max_images).bit_length()) if max_images]
            zeros_r = np.zeros((r,), np.int32)
            s = self.min_chunk
            while s <= self.max_chunk:
                for k in image_counts:
                    chunk = {"tokens": _put(np.zeros((r, s), np.int32)), "valid": _put(np.zeros((r, s), bool))}
                    if k:
                        shapes_of = {"patches": (k, v.max_patches, v.patch_size ** 2 * 3),
                                     "patch_yx": (k, v.max_patches, 2), "patch_valid": (k, v.max_patches),
                                     "image_grid": (k, 2), "image_valid": (k,)}
                        chunk.update({n: _put(np.zeros(shp, IMAGE_DTYPES[n])) for n, shp in shapes_of.items()})
                    self._run_extend(chunk, np.zeros((r, width), np.int32), zeros_r, zeros_r, [])
                    shapes += 1
                s *= 2
            zeros_b = _put(np.zeros((self.max_slots,), np.int32))
            decode.sample_rows(self._last, *self._rows((zeros_b, self._params([]), zeros_b)), self.banned)
            self.cache = decode.copy_forked_pages(self.cache, zeros_b, zeros_b)
            widths = sorted({min(1 << i, width) for i in range(width.bit_length() + 1)})
            for w in widths:
                for b in self.decode_rows:
                    self._run_decode([], w, b)
            return shapes + 2 + len(widths) * len(self.decode_rows)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._queue and all(s is None for s in self._slot_seq)

    @property
    def queued_samples(self) -> int:
        """Samples waiting for a slot (a scheduler above the engine keeps this from running dry)."""
        with self._lock:
            return sum(len(job.seqs) for job in self._queue)

    def step(self) -> list[Completion]:
        """One scheduler iteration: admit what fits and extend it, then one decode call of `steps` tokens
        per live slot. Returns the requests that finished (their on_done already called)."""
        with self._lock:
            finished: list[Completion] = []
            admitted = self._admit()
            if admitted:
                self._prefill(admitted, finished)
            if any(s is not None for s in self._slot_seq):
                self._decode(finished)
            return finished

    def run(self) -> list[Completion]:
        """Step until nothing is queued or running; returns every completion in finishing order."""
        done = []
        while not self.idle:
            done += self.step()
        return done

    def metrics(self) -> dict[str, float]:
        """Counters since construction, and the current load."""
        with self._lock:
            m = dict(self._metrics)
            m.update(queued=len(self._queue), running_slots=sum(s is not None for s in self._slot_seq),
                     held=sum(j.state == "held" for j in self._jobs.values()), free_pages=self.pool.free_pages,
                     num_pages=self.pool.num_pages, weight_version=self.version)
            total = m.get("slot_steps", 0)
            m["useful_slot_fraction"] = m.get("useful_slot_steps", 0) / total if total else 0.0
            if m.get("spec_rounds"):  # tau: tokens per round; acceptance rate of draft j given j-1 accepted
                m["spec_tau"] = m["spec_tokens"] / m["spec_rounds"]
                reached = m["spec_rounds"]
                for j in range(1, self.speculate + 1):
                    m[f"spec_acceptance_{j}"] = m[f"spec_accepted_{j}"] / reached if reached else 0.0
                    reached = m[f"spec_accepted_{j}"]
            return m

    # ---------------------------------------------------------------- internals
    def _job(self, rid: int) -> _Job:
        if rid not in self._jobs:
            raise KeyError(f"unknown request id {rid!r}")
        return self._jobs[rid]

    def _render(self, messages, *, what: str, **kwargs) -> tuple[list[int], dict | None]:
        if self.tokenizer is None:
            raise ValueError(f"{what}: messages need the engine's tokenizer (Engine(..., tokenizer=...))")
        try:
            return chat.render_messages(self.tokenizer, messages, self.spec, **kwargs)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    def _check(self, job: _Job, *, what: str) -> None:
        r, vocab = job.request, self.spec.backbone.vocab_size
        tokens = job.new_tokens
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(f"{what}: tokens must be a non-empty list of ids")
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"{what}: token ids must be in [0, {vocab})")
        if not 1 <= r.n <= self.max_slots:
            raise ValueError(f"{what}: n={r.n} must be in [1, max_slots={self.max_slots}]")
        if r.keep and r.n != 1:
            raise ValueError(f"{what}: keep=True needs n=1 (a held conversation is one sequence)")
        if job.budget < 1:
            raise ValueError(f"{what}: max_new_tokens must be >= 1, got {job.budget}")
        if len(job.stop) > self.max_stop_ids:
            raise ValueError(f"{what}: {len(job.stop)} stop ids, the engine takes at most {self.max_stop_ids}")
        sampling_params(1, temperature=r.sampling.temperature, top_k=r.sampling.top_k, top_p=r.sampling.top_p)
        check_images(tokens, job.new_images, self.spec.image_token_id, self.spec.vision.merge_size, what)
        chunks(tokens, self.spec.image_token_id, self.max_chunk)  # an image block longer than a chunk: refused
        length = job.seqs[0].length + len(tokens)
        if length >= self.capacity:
            raise ValueError(f"{what}: {length} tokens leave no room to generate in max_seq_len={self.capacity}")
        pages = self._turn_pages(job)
        if pages > self.pool.num_pages:
            raise ValueError(f"{what}: needs {pages} pages, the pool has {self.pool.num_pages}")

    def _final_length(self, job: _Job) -> int:
        """Tokens the turn may write: prompt and budget up to capacity, and a verify's k drafts."""
        return min(job.seqs[0].length + len(job.new_tokens) + job.budget, self.capacity) + self.speculate

    def _private_from(self, job: _Job) -> int:
        """The first index a fork may write in any stack: the prompt's length, or with speculation the
        MTP stream's committed length after the prompt (shorter: compacted)."""
        tokens = job.new_tokens
        if not self.speculate:
            return len(tokens)
        visual = tokens == self.spec.image_token_id
        ones = np.ones(len(tokens) - 1, bool)
        keep = stream_keep(ones, ones, visual[:-1], visual[1:], MMTPMode(self.spec.mtp.mode))
        return int(np.sum(keep))

    def _turn_pages(self, job: _Job) -> int:
        """Free pages this turn needs: the first sample's growth, plus each fork's unshared pages."""
        need = pages_needed(self._final_length(job), self.page_size)
        prompt = job.seqs[0].length + len(job.new_tokens)
        private = min(prompt, self._private_from(job)) if len(job.seqs) > 1 else prompt
        return need - len(job.seqs[0].pages) + (len(job.seqs) - 1) * (need - private // self.page_size)

    def _admit(self) -> list[_Job]:
        admitted = []
        free = [i for i, s in enumerate(self._slot_seq) if s is None]
        at = 0  # queue position looked at: the head, then up to `admit_lookahead` requests behind it
        while at < len(self._queue):
            job = self._queue[at]
            if 0 < len(free) < len(job.seqs) and self._can_split(job):
                first, rest = job.split(len(free))
                if self._turn_pages(first) <= self.pool.free_pages:  # the free slots take part of the group now
                    self._queue[at] = first
                    self._queue.insert(at + 1, rest)
                    job = first
                    self._metrics["partial_admissions"] += 1
            if len(job.seqs) > len(free) or self._turn_pages(job) > self.pool.free_pages:
                self._metrics["admission_waits"] += 1  # waits its turn: no slot or not enough free pages
                if at >= self.admit_lookahead:
                    break
                at += 1
                continue
            del self._queue[at]
            final = self._final_length(job)
            first = job.seqs[0]
            self.pool.grow(first.pages, final)
            prompt = first.length + len(job.new_tokens)
            job.copies = []
            private = self._private_from(job) if len(job.seqs) > 1 else prompt
            for seq in job.seqs[1:]:
                fork = self.pool.fork(first.pages, prompt, private)
                self.pool.grow(fork.pages, final)
                seq.pages, job.copies = fork.pages, job.copies + fork.copies
            for seq in job.seqs:
                seq.slot = free.pop(0)
                self._slot_seq[seq.slot] = (job, seq)
            job.state = job.owner.state = "running"
            admitted.append(job)
        return admitted

    def _can_split(self, job: _Job) -> bool:
        """A group not started yet (its first turn, nothing prefilled), with admit_partial on."""
        return self.admit_partial and job.seqs[0].length == 0 and not job.request.keep

    def _prefill(self, jobs: list[_Job], finished: list[Completion]) -> None:
        """Extend every admitted job's first sample by its new tokens, chunk by chunk, batched; sample each
        job's first tokens; copy the forks' pages."""
        work = [(job, chunks(job.new_tokens, self.spec.image_token_id, self.max_chunk)) for job in jobs]
        for j in range(max(len(c) for _, c in work)):
            rows = [(job, c[j], j == len(c) - 1) for job, c in work if j < len(c)]
            for i in range(0, len(rows), self.prefill_rows):
                self._extend_call(rows[i:i + self.prefill_rows])
        copies = [c for job in jobs for c in job.copies]
        if copies:
            pad = [(copies[0][0], copies[0][0])] * (self.max_slots - len(copies))  # a page onto itself
            src, dst = (_put(np.asarray(x, np.int32)) for x in zip(*(copies + pad)))
            self.cache = decode.copy_forked_pages(self.cache, src, dst)
        for job in jobs:
            first = job.seqs[0]
            for seq in job.seqs[1:]:
                seq.length, seq.offset = first.length, first.offset
                seq.draft = None if first.draft is None else {k: v.copy() for k, v in first.draft.items()}
                seq.sample.expert_ids = list(first.sample.expert_ids)  # the shared prompt's routing
        self._first_tokens(jobs, finished)

    def _extend_call(self, rows) -> None:
        r, width = self.prefill_rows, self.pages_per_seq
        n_max = max(end - start for _, (start, end, _, _), _ in rows)
        s = min(pow2(n_max, self.min_chunk), self.max_chunk)
        tokens, valid = np.zeros((r, s), np.int32), np.zeros((r, s), bool)
        table, start, offsets = np.zeros((r, width), np.int32), np.zeros((r,), np.int32), np.zeros((r,), np.int32)
        images = []
        for i, (job, (a, b, ia, ib), _) in enumerate(rows):
            seq = job.seqs[0]
            tokens[i, :b - a], valid[i, :b - a] = job.new_tokens[a:b], True
            table[i, :len(seq.pages)] = seq.pages
            start[i], offsets[i] = seq.length, seq.offset
            if ib > ia:
                images.append({k: np.asarray(job.new_images[k])[ia:ib] for k in IMAGE_KEYS})
        chunk = {"tokens": _put(tokens), "valid": _put(valid)}
        if images:
            padded = pad_images(images)
            self._metrics["images_encoded"] += int(padded["image_valid"].sum())
            chunk.update({k: _put(v) for k, v in padded.items()})
        if self.speculate:
            for job, _, _ in rows:
                if job.seqs[0].draft is None:
                    job.seqs[0].draft = speculative.empty_draft(self.speculate + 1, self.spec.backbone.embed_dim)
        new_offsets, left = self._run_extend(chunk, table, start, offsets, [job.seqs[0].draft for job, _, _ in rows])
        routing = np.asarray(self._routing) if self.record_routing else None
        self._metrics["prefill_calls"] += 1
        for i, (job, (a, b, _, _), _) in enumerate(rows):
            seq = job.seqs[0]
            seq.length += b - a
            seq.offset = int(new_offsets[i])
            if routing is not None:
                seq.sample.expert_ids.extend(routing[i, :b - a])
            if self.speculate:
                seq.draft = speculative.row_draft(left, i)
        last_rows = [(i, job) for i, (job, _, is_last) in enumerate(rows) if is_last]
        if last_rows:
            self._sample_first(last_rows)

    def _run_extend(self, chunk: dict, table, start, offsets, drafts: list) -> tuple[np.ndarray, Any]:
        """One extend call (with the MTP stream when speculating): (new offsets, the drafts left or None)."""
        chunk = {**chunk, **self._rows({"tokens": chunk["tokens"], "valid": chunk["valid"]})}
        args = (self.graphdef, self.state, self.cache, chunk, *self._rows((_put(table), _put(start), _put(offsets))))
        if not self.speculate:
            self.cache, new_offsets, self._last, self._routing = decode.extend(*args)
            return np.asarray(new_offsets), None
        stacked = self._rows(speculative.stack_drafts(drafts, self.prefill_rows, self.speculate + 1,
                                                      self.spec.backbone.embed_dim))
        self.cache, new_offsets, self._last, left, self._routing = speculative.extend_speculative(*args, stacked)
        return np.asarray(new_offsets), jax.device_get(left)

    def _rows(self, tree):
        """Per-row arrays (slots, prefill rows) split over the mesh's batch axes (`data`, `fsdp`) where the
        rows divide; the cache stays whole on those axes (KV heads over `tensor`), so any slot reads any page."""
        if self.mesh is None:
            return tree
        axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.axis_names)
        n = int(np.prod([self.mesh.shape[a] for a in axes]))
        rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(axes))
        return jax.tree.map(lambda x: jax.device_put(x, rows) if x.ndim and x.shape[0] % n == 0 else x, tree)

    def _params(self, rows: list[tuple[int, _Job, _Seq]], size: int | None = None):
        """Sampling parameters of `size` (default max_slots) rows: (row, job, seq) entries, greedy elsewhere."""
        b = size or self.max_slots
        temp, top_k, top_p, seed = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b), np.zeros(b)
        for i, job, seq in rows:
            s = job.request.sampling
            temp[i], top_k[i], top_p[i], seed[i] = s.temperature, s.top_k, s.top_p, job.seed + seq.index
        return self._rows(sampling_params(b, temperature=temp, top_k=top_k, top_p=top_p, seed=seed))

    def _sample_first(self, last_rows) -> None:
        """The first token of every sample of the jobs whose prompts ended in the last extend call."""
        b = self.max_slots
        rows, counter = np.zeros((b,), np.int32), np.zeros((b,), np.int32)
        slots = [(job, seq) for _, job in last_rows for seq in job.seqs]
        for k, (row, job) in enumerate((row, job) for row, job in last_rows for _ in job.seqs):
            rows[k], counter[k] = row, job.seqs[0].length
        params = self._params([(k, job, seq) for k, (job, seq) in enumerate(slots)])
        tok, raw, smp = (np.asarray(x) for x in decode.sample_rows(self._last, *self._rows((_put(rows), params,
                                                                   _put(counter))), self.banned))
        for k, (job, seq) in enumerate(slots):
            seq.first = (int(tok[k]), float(raw[k]), float(smp[k]))

    def _first_tokens(self, jobs: list[_Job], finished: list[Completion]) -> None:
        for job in jobs:
            for seq in job.seqs:
                t, lr, ls = seq.first
                self._emit(seq, t, lr, ls)
                if seq.draft is not None:  # the prompt's last position waited for this token
                    seq.draft["next_tokens"][seq.draft["count"] - 1] = t
                seq.count, seq.limit = 1, min(job.budget, self.capacity - seq.length)
                if t in job.stop:
                    self._end(seq, "stop")
                elif seq.count >= seq.limit:
                    self._end(seq, "length" if seq.limit == job.budget else "capacity")
            self._maybe_done(job, finished)

    def _emit(self, seq: _Seq, token: int, logp_raw: float, logp_sampled: float) -> None:
        s = seq.sample
        s.tokens.append(token)
        s.logp_raw.append(logp_raw)
        s.logp_sampled.append(logp_sampled)
        s.versions.append(self.version)
        self._metrics["tokens"] += 1

    def _decode(self, finished: list[Completion]) -> None:
        live_seqs = [(i, js) for i, js in enumerate(self._slot_seq) if js is not None and js[1].sample.finish is None]
        longest = max(js[1].length for _, js in live_seqs) + self.steps * (self.speculate + 1)
        width = min(pow2(pages_needed(longest, self.page_size)), self.pages_per_seq)
        b = min(r for r in self.decode_rows if r >= len(live_seqs))
        live_seqs = list(enumerate(js for _, js in live_seqs))  # packed: row j of the call
        after, emitted, drafts, acc = self._run_decode([(j, job, seq) for j, (job, seq) in live_seqs], width, b)
        if self.speculate:
            ran, useful = int(acc.ran), int(acc.rounds)
            self._metrics.update(spec_rounds=useful, spec_tokens=int(acc.emitted),
                                 **{f"spec_accepted_{j + 1}": int(a) for j, a in enumerate(acc.accepted)})
        toks, raw, smp, stopped = (np.asarray(x) for x in emitted[:4])
        routing = np.asarray(emitted.expert_ids) if self.record_routing else None
        length, offset, count, still = (np.asarray(x) for x in (after.length, after.offset, after.count, after.live))
        if not self.speculate:
            ran, useful = int((toks >= 0).any(axis=0).sum()), int((toks >= 0).sum())
        self._metrics.update(decode_calls=1, decode_steps=ran, slot_steps=ran * b, useful_slot_steps=useful)
        for i, (job, seq) in live_seqs:
            if self.speculate:
                seq.draft = speculative.row_draft(drafts, i)
            for t in np.flatnonzero(toks[i] >= 0):
                self._emit(seq, int(toks[i, t]), float(raw[i, t]), float(smp[i, t]))
                if routing is not None:
                    seq.sample.expert_ids.append(routing[i, t])
            seq.length, seq.offset, seq.count = int(length[i]), int(offset[i]), int(count[i])
            if not still[i]:
                self._end(seq, "stop" if stopped[i] else "length" if seq.limit == job.budget else "capacity")
        for job in {id(j): j for _, (j, _) in live_seqs}.values():
            self._maybe_done(job, finished)

    def _run_decode(self, rows: list[tuple[int, _Job, _Seq]], width: int, b: int):
        """One decode call of `b` rows (`rows`: (row, job, seq) of the live ones) with a page table `width`
        pages wide: (slots after, Emitted, the drafts after and Acceptance (speculating) or None)."""
        table = np.zeros((b, width), np.int32)
        pending, length, offset, count, limit = (np.zeros((b,), np.int32) for _ in range(5))
        live, stop_ids = np.zeros((b,), bool), np.full((b, self.max_stop_ids), -1, np.int32)
        for i, job, seq in rows:
            n = min(len(seq.pages), width)
            table[i, :n] = seq.pages[:n]
            pending[i], length[i], offset[i] = seq.sample.tokens[-1], seq.length, seq.offset
            count[i], limit[i], live[i] = seq.count, seq.limit, True
            stop_ids[i, :len(job.stop)] = job.stop
        slots = self._rows(decode.Slots(*(_put(x) for x in (table, pending, length, offset, live, count, limit,
                                                            stop_ids))))
        params = self._params(rows, b)
        if not self.speculate:
            self.cache, after, emitted = decode.decode_steps(self.graphdef, self.state, self.steps, self.cache, slots,
                                                             params, self.banned)
            return after, emitted, None, None
        by_slot = {i: seq.draft for i, _, seq in rows}
        drafts = self._rows(speculative.stack_drafts([by_slot.get(i) for i in range(b)], b, self.speculate + 1,
                                                     self.spec.backbone.embed_dim))
        self.cache, after, drafts, emitted, acc = speculative.speculative_steps(
            self.graphdef, self.state, self.speculate, self.steps, self.cache, slots, drafts, params, self.banned)
        return (after, emitted, *jax.device_get((drafts, acc)))

    def _end(self, seq: _Seq, reason: str) -> None:
        seq.sample.finish = reason
        seq.sample.remaining = max(seq.job.budget - seq.count, 0)
        if seq.slot is not None:
            self._slot_seq[seq.slot] = None
            seq.slot = None

    def _maybe_done(self, job: _Job, finished: list[Completion]) -> None:
        job = job.owner  # a part's request completes with its last sample
        if job.state != "running" or any(s.sample.finish is None for s in job.seqs):
            return
        if job.request.keep:
            job.state = "held"
        else:
            self._drop(job)
        self._metrics["completed"] += 1
        done = self._completion(job)
        finished.append(done)
        if job.request.on_done is not None:
            job.request.on_done(done)

    def _drop(self, job: _Job) -> None:
        for seq in job.seqs:
            if seq.pages:
                self.pool.release(seq.pages)
            seq.pages = []
        job.state = "done"

    def _completion(self, job: _Job) -> Completion:
        """A snapshot: the engine's own samples keep growing if the conversation is extended."""
        return Completion(job.id, job.prompt_length, [s.sample.copy() for s in job.seqs])
