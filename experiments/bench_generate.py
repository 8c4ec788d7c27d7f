"""Our generation engine against tunix's `Sampler`, on the same weights, in one process.

    python experiments/bench_generate.py                          # CPU: the tiny preset in float32, a few minutes
    python experiments/bench_generate.py --preset=0p5b --dtype=bfloat16 --slots=32 --requests=256   # accelerator
    pip install -e '.[bench]'                                     # tunix (google-tunix) for its columns

The model is `configs/vlm_pretrain.py:<preset>` with random weights (seed 0). Five measurements:

1. compiles per sampling-parameter change: jax compile events (`/jax/core/compile/backend_compile_duration`)
   during a second identical call whose only change is temperature / top_k / top_p (and then greedy).
   Goal for ours: 0. tunix keeps them as static fields of its jitted prefill and decode (2 compiles).
2. decode time at cache capacity 4096 vs 512 for the same work (same prompts, same new tokens, sampled
   at temperature 1, no stop): the time inside the decode calls (ours: `Engine._decode`, tunix: its
   compiled decode loop), best of `--repeats` after a warm-up call. Goal <= 1.3x: our decode page-table
   width is bucketed by the longest live sequence; tunix attends over its whole dense cache.
3. useful slot-steps under lognormal response lengths (per-request `max_new_tokens` drawn lognormal, no
   stop ids): the engine's `useful_slot_fraction` and tokens/s with continuous batching (every request
   submitted, `run()`) against static batching on the same engine (submit `slots` requests, `run()` until
   the longest of them ends, then the next batch). Goals: fraction >= 0.8, tokens/s >= 2x static.
4. prefill and ViT calls for a group of G samples of an image prompt: the engine's `prefill_calls` and
   `images_encoded` (goal 1 each: the other G-1 samples fork the prompt's pages), and the same G samples
   submitted as G separate requests, which is what a sampler without group forking does.
5. engine-vs-trainer logprob gap: max |logp_raw - log_softmax(trainer's full forward)| over sampled
   tokens of text and image prompts (goal <= 1e-5 in float32); for tunix the same over its greedy logprobs.

tunix on our weights: tunix's `Sampler` drives any NNX module with the call signature of its own models,
`(tokens [B, T], positions [B, T], cache, attention_mask [B, T, C]) -> (logits, cache)` and an
`init_cache(batch, cache_size, dtype)`. `TunixAdapter` is that module around our backbone (text only): our
embedding, RMSNorms, q/k/v projections with QK-Norm and partial rotary (text positions t = h = w), dense
and MoE MLPs and head, on a dense contiguous KV cache `[L, B, C, KV, D]` of the size tunix allocates,
written at tunix's `end_index` and attended over in full under tunix's mask, as tunix's own models do.
Its greedy tokens are checked against our engine's (the same model). tunix is optional: without it the
tunix cells say "not installed" and our columns still run.

Output: a summary table and one table per measurement, printed and written with a json of every number to
`<out_dir>/generate_<device>[_<preset>].md|.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Request, Sampling
from glm5v_jax.generate.chat import image_inputs
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.tools.compiles import COMPILE_EVENT, count_compiles
from glm5v_jax.train.writers import json_default

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SAMPLED = Sampling(temperature=1.0, top_k=0, top_p=1.0)  # call A of measurement 1, and the sampling of 2
CHANGED = Sampling(temperature=0.7, top_k=20, top_p=0.9)  # call B: only the parameters differ
GREEDY = Sampling(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Workload sizes (the defaults: the CPU run on the tiny preset)."""

    slots: int = 8  # engine decode slots = tunix batch rows
    page_size: int = 16
    steps: int = 8  # decode steps per engine call
    prompt_len: tuple[int, int] = (12, 48)  # text prompt lengths, uniform in [lo, hi]
    max_chunk: int = 64  # longest prompt chunk (tunix: the padded prompt length)
    compile_new_tokens: int = 16  # measurement 1
    capacities: tuple[int, int] = (512, 4096)  # measurement 2: small, large
    capacity_new_tokens: int = 64
    repeats: int = 2
    requests: int = 64  # measurement 3
    length_median: float = 32.0  # lognormal response lengths: median and sigma of log length
    length_sigma: float = 1.0
    length_max: int = 384
    group: int = 8  # measurement 4: G
    image_size: tuple[int, int] = (96, 128)
    logprob_new_tokens: int = 16  # measurement 5
    seed: int = 0


SMOKE = Settings(slots=4, page_size=8, steps=4, prompt_len=(4, 12), max_chunk=32, compile_new_tokens=4,
                 capacities=(64, 256), capacity_new_tokens=8, repeats=1, requests=8, length_median=6.0,
                 length_sigma=0.8, length_max=40, group=4, image_size=(32, 48), logprob_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------



class Timer:
    """Wraps `obj.name` (an instance attribute) and adds up the wall time of its calls, outputs ready."""

    def __init__(self, obj, name: str):
        self.seconds, self.calls = 0.0, 0
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = jax.block_until_ready(inner(*args, **kwargs))
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out
        setattr(obj, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def text_prompts(spec, n: int, lengths: tuple[int, int], rng: np.random.Generator) -> list[list[int]]:
    """n prompts of ordinary token ids (above the `<|image|>` id, which both samplers never emit)."""
    lo = spec.image_token_id + 1
    return [rng.integers(lo, spec.backbone.vocab_size, size=int(rng.integers(lengths[0], lengths[1] + 1))).tolist()
            for _ in range(n)]


def image_prompt(spec, size: tuple[int, int], rng: np.random.Generator) -> tuple[list[int], dict]:
    pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    images, k = image_inputs(pixels, spec)
    lo = spec.image_token_id + 1
    before, after = (rng.integers(lo, spec.backbone.vocab_size, size=m).tolist() for m in (4, 8))
    return before + [spec.image_token_id] * k + after, images


def make_engine(model, s: Settings, capacity: int, slots: int | None = None, num_pages: int | None = None,
                **kw) -> Engine:
    """The engine of every measurement; the page pool defaults to the engine's (slots x capacity)."""
    return Engine(model, max_slots=slots or s.slots, max_seq_len=capacity, page_size=s.page_size,
                  num_pages=num_pages, prefill_rows=min(4, slots or s.slots), max_chunk=s.max_chunk, min_chunk=16,
                  steps=s.steps, **kw)


COUNTERS = ("prefill_calls", "images_encoded", "decode_calls", "decode_steps", "slot_steps", "useful_slot_steps",
            "tokens", "completed")


def delta(before: dict, after: dict) -> dict:
    """The engine's counters between two `metrics()` snapshots, with the useful slot-step fraction."""
    d = {k: int(after.get(k, 0) - before.get(k, 0)) for k in COUNTERS}
    d["useful_slot_fraction"] = d["useful_slot_steps"] / d["slot_steps"] if d["slot_steps"] else 0.0
    return d


def run_requests(engine: Engine, prompts, sampling: Sampling, new_tokens) -> list:
    budgets = np.broadcast_to(np.asarray(new_tokens), (len(prompts),))
    for p, m in zip(prompts, budgets):
        engine.submit(Request(p, sampling=sampling, max_new_tokens=int(m)))
    return engine.run()


# ---------------------------------------------------------------------------------------------
# tunix on our weights
# ---------------------------------------------------------------------------------------------

def tunix_version() -> str | None:
    """The installed google-tunix version, or None when tunix cannot be imported."""
    try:
        import tunix.generate.sampler  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: its columns say so
        return None
    from importlib import metadata
    try:
        return metadata.version("google-tunix")
    except metadata.PackageNotFoundError:
        return "unknown"


class IdTokenizer:
    """The tokenizer interface tunix's `TokenizerAdapter` accepts: prompts are space-separated token ids.
    pad = eos = the `<|image|>` id (never in a text prompt; banned from sampling), no BOS."""

    def __init__(self, pad_id: int):
        self._pad = pad_id

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self._pad

    def pad_id(self) -> int:
        return self._pad


def _masked_attention(q, k, v, mask, scale):
    """q `[B, T, H, D]` over a dense cache k, v `[B, C, KV, D]` where mask `[B, T, C]`; float32, GQA
    grouping as in our attention (query head h reads kv head h // (H / KV))."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bckd->bkgtc", qg, k.astype(jnp.float32)) * scale
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, -1e30), axis=-1)
    out = jnp.einsum("bkgtc,bckd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


class TunixAdapter(nnx.Module):
    """Our backbone (text only) behind the transformer interface of tunix's `Sampler`; see the module
    docstring. The parameters are the model's own (shared, not copied)."""

    def __init__(self, model: GLM5V):
        self.backbone = model.backbone
        self.num_embed = model.spec.backbone.vocab_size  # read by tunix for its logits buffer

    def init_cache(self, batch_size: int, cache_size: int, dtype=None) -> dict:
        spec = self.backbone.spec
        layers = {"dense_layers": spec.first_k_dense, "moe_layers": spec.num_moe_layers}
        shape = (batch_size, cache_size, spec.num_kv_heads, spec.head_dim)
        cache = {name: {"k": jnp.zeros((layers[name], *shape), spec.dtype),
                        "v": jnp.zeros((layers[name], *shape), spec.dtype)} for name in self.backbone.stacks()}
        return {**cache, "end_index": jnp.zeros((batch_size,), jnp.int32)}

    def __call__(self, tokens, positions, cache, attention_mask, decode_only_last_token: bool = False, **unused):
        backbone = self.backbone
        x = backbone.embed_tokens(tokens)
        rotary = backbone.rotary_tables(jnp.repeat(positions[..., None], 3, axis=-1))  # text: t = h = w
        end = cache["end_index"][0]  # tunix writes every row at the same index (left-padded prompts)
        scale = backbone.spec.head_dim ** -0.5

        def body(block, h, layer_cache):
            attn = block.attn
            normed = block.attn_norm(h)
            q, k = attn.queries_keys(normed, rotary)
            v = attn._project(normed.astype(attn.dtype), attn.v, attn.v_bias)
            k_all, v_all = (jax.lax.dynamic_update_slice(layer_cache[n], new.astype(layer_cache[n].dtype),
                                                         (0, end, 0, 0)) for n, new in (("k", k), ("v", v)))
            out = _masked_attention(q, k_all, v_all, attention_mask, scale)
            h = h + jnp.einsum("bshd,hde->bse", out.astype(attn.dtype), attn.o[...].astype(attn.dtype))
            y = block.mlp(block.mlp_norm(h))
            y = y[0] if block.is_moe else y
            return h + y.astype(h.dtype), {"k": k_all, "v": v_all}

        new = {}
        for name, stack in backbone.stacks().items():
            # jax.lax.scan over the split stack, not nnx.scan: tunix merges the module inside its own
            # while_loop, where an nnx transform refuses variables of the outer trace
            graphdef, weights = nnx.split(stack)

            def step(h, layer, graphdef=graphdef):
                return body(nnx.merge(graphdef, layer[0]), h, layer[1])
            x, new[name] = jax.lax.scan(step, x, (weights, cache[name]))
        if decode_only_last_token:
            x = x[:, -1:]
        new["end_index"] = cache["end_index"] + tokens.shape[1]
        return backbone.logits(x), new


class TunixRunner:
    """tunix's `Sampler` on our model at one cache size, called with token-id prompts."""

    def __init__(self, model: GLM5V, cache_size: int, prompt_len: int):
        from tunix.generate import sampler as tunix_sampler

        spec = model.spec.backbone
        self.pad = model.spec.image_token_id
        self.prompt_len = prompt_len
        config = tunix_sampler.CacheConfig(cache_size=cache_size, num_layers=spec.num_layers,
                                           num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
        self.sampler = tunix_sampler.Sampler(TunixAdapter(model), IdTokenizer(self.pad), config)
        self.decode_timer = Timer(self.sampler, "_compiled_decode_fn")
        self.prefill_timer = Timer(self.sampler, "_compiled_prefill_fn")

    def __call__(self, prompts, new_tokens: int, sampling: Sampling, *, logprobs: bool = False, ban: bool = True):
        """tunix's call for `sampling`: greedy when temperature is 0, else its top-p mode (top_k 0: none)."""
        sampled = sampling.temperature > 0
        return self.sampler([" ".join(map(str, p)) for p in prompts], max_generation_steps=new_tokens,
                            max_prompt_length=self.prompt_len, temperature=sampling.temperature if sampled else 0.0,
                            top_p=sampling.top_p if sampled else None, top_k=(sampling.top_k or None) if sampled
                            else None, seed=sampling.seed or 0, return_logprobs=logprobs,
                            forbidden_tokens=(self.pad,) if ban else None)


# ---------------------------------------------------------------------------------------------
# The five measurements
# ---------------------------------------------------------------------------------------------

def measure_compiles(model, s: Settings, prompts, tunix: bool, log) -> dict:
    """1. Compile events of a first call, of the same call again, then with temperature/top_k/top_p
    changed, then greedy. Ours: one engine, the same requests each time (fixed lengths: same shapes)."""
    calls = (("first call", SAMPLED), ("same parameters again", SAMPLED),
             ("temperature/top_k/top_p changed", CHANGED), ("sampled -> greedy", GREEDY))
    out = {"calls": [c for c, _ in calls], "ours": [], "tunix": None, "ours_names": [], "tunix_names": None}
    engine = make_engine(model, s, s.capacities[0])
    for _, sampling in calls:
        with count_compiles() as events:
            run_requests(engine, prompts, sampling, s.compile_new_tokens)
        out["ours"].append(len(events))
        out["ours_names"].append(events)
    if tunix:
        runner = TunixRunner(model, s.capacities[0], s.max_chunk)
        out["tunix"], out["tunix_names"] = [], []
        for _, sampling in calls:
            with count_compiles() as events:
                runner(prompts, s.compile_new_tokens, sampling)
            out["tunix"].append(len(events))
            out["tunix_names"].append(events)
    log(f"  compiles per call {out['calls']}: ours {out['ours']}, tunix {out['tunix']}")
    return out


def measure_capacity(model, s: Settings, prompts, tunix: bool, log) -> dict:
    """2. Decode seconds (and whole-call seconds) for the same requests at the small and large capacity; for
    ours also the large capacity with the small one's page pool (`ours_small_pool`), which tells the cost of
    the capacity (`max_seq_len`) from that of the pool size (`num_pages`, by default slots x capacity)."""
    new = s.capacity_new_tokens
    out = {"capacities": list(s.capacities), "new_tokens": new, "rows": len(prompts), "ours": [], "tunix": None}
    small_pool = s.slots * -(-s.capacities[0] // s.page_size)
    for cap, pages in ((s.capacities[0], None), (s.capacities[1], None), (s.capacities[1], small_pool)):
        engine = make_engine(model, s, cap, num_pages=pages)
        timer = Timer(engine, "_decode")
        run_requests(engine, prompts, SAMPLED, new)  # warm-up: compiles this capacity's shapes
        best = None
        for _ in range(s.repeats):
            timer.reset()
            t = time.perf_counter()
            done = run_requests(engine, prompts, SAMPLED, new)
            total = time.perf_counter() - t
            tokens = sum(len(smp.tokens) for c in done for smp in c.samples)
            if best is None or timer.seconds < best["decode_s"]:
                best = {"decode_s": timer.seconds, "total_s": total, "decode_calls": timer.calls, "tokens": tokens,
                        "num_pages": engine.pool.num_pages}
        out["ours"].append(best)
    out["ours_small_pool"] = out["ours"].pop()
    if tunix:
        out["tunix"] = []
        for cap in s.capacities:
            runner = TunixRunner(model, cap, s.max_chunk)
            runner(prompts, new, SAMPLED)  # warm-up
            best = None
            for _ in range(s.repeats):
                runner.decode_timer.reset()
                t = time.perf_counter()
                res = runner(prompts, new, SAMPLED)
                total = time.perf_counter() - t
                tokens = sum(len(x) for x in res.tokens)
                if best is None or runner.decode_timer.seconds < best["decode_s"]:
                    best = {"decode_s": runner.decode_timer.seconds, "total_s": total, "tokens": tokens}
            out["tunix"].append(best)
    for who in ("ours", "tunix"):
        rows = out[who]
        out[f"{who}_ratio"] = rows[1]["decode_s"] / rows[0]["decode_s"] if rows else None
    out["ours_small_pool_ratio"] = out["ours_small_pool"]["decode_s"] / out["ours"][0]["decode_s"]
    log(f"  decode s at capacities {s.capacities}: ours {[round(r['decode_s'], 3) for r in out['ours']]}"
        f" tunix {[round(r['decode_s'], 3) for r in out['tunix']] if out['tunix'] else None}")
    return out


def lognormal_lengths(s: Settings, rng: np.random.Generator) -> np.ndarray:
    draws = rng.lognormal(math.log(s.length_median), s.length_sigma, size=s.requests)
    return np.clip(np.round(draws), 1, s.length_max).astype(int)


def measure_batching(model, s: Settings, prompts, lengths, log) -> dict:
    """3. The same requests under continuous batching (all submitted, one `run()`) and static batching
    (`slots` requests submitted, `run()` to the end of the batch's longest, then the next batch; every
    decode step computes the whole batch, as a static sampler such as tunix's does: `decode_row_buckets=1`),
    on warmed-up engines (compiles while timed are counted: 0 expected); best of `repeats`, alternating."""
    engines = {"continuous": make_engine(model, s, s.capacities[0]),
               "static": make_engine(model, s, s.capacities[0], decode_row_buckets=1)}
    for engine in engines.values():
        engine.warmup()
    out = {"requests": len(prompts), "slots": s.slots, "steps_per_call": s.steps,
           "lengths": {"median": float(np.median(lengths)), "mean": float(np.mean(lengths)),
                       "max": int(lengths.max()), "min": int(lengths.min()), "sigma": s.length_sigma}}
    for _ in range(s.repeats):  # alternating, best wall time of each mode (the host may be shared)
        for mode in ("static", "continuous"):
            engine = engines[mode]
            before = engine.metrics()
            queue_empty = None  # the counters when the last request was admitted (continuous)
            with count_compiles() as compiles:
                t = time.perf_counter()
                if mode == "continuous":
                    for p, m in zip(prompts, lengths):
                        engine.submit(Request(p, sampling=SAMPLED, max_new_tokens=int(m)))
                    while not engine.idle:  # = engine.run(), watching for the queue to empty
                        engine.step()
                        if queue_empty is None and engine.metrics()["queued"] == 0:
                            queue_empty = engine.metrics()
                else:
                    for i in range(0, len(prompts), s.slots):
                        run_requests(engine, prompts[i:i + s.slots], SAMPLED, lengths[i:i + s.slots])
                wall = time.perf_counter() - t
            d = delta(before, engine.metrics())
            d.update(wall_s=wall, tokens_per_s=d["tokens"] / wall, compiles=len(compiles))
            if queue_empty is not None:  # useful fraction while requests waited, and in the drain after
                d["while_queued"], d["drain"] = delta(before, queue_empty), delta(queue_empty, engine.metrics())
            log(f"  {mode}: useful {d['useful_slot_fraction']:.3f}, {d['tokens']} tokens in {wall:.2f} s "
                f"({d['tokens_per_s']:.0f}/s), decode steps {d['decode_steps']}, prefill calls "
                f"{d['prefill_calls']}, compiles {len(compiles)}")
            if mode not in out or wall < out[mode]["wall_s"]:
                out[mode] = d
    out["speedup"] = out["continuous"]["tokens_per_s"] / out["static"]["tokens_per_s"]
    return out


def measure_group(model, s: Settings, rng, log) -> dict:
    """4. Prefill calls and images encoded for G samples of one image prompt: one request with n=G, and
    G requests of the same prompt (no forking)."""
    prompt, images = image_prompt(model.spec, s.image_size, rng)
    engine = make_engine(model, s, s.capacities[0], slots=max(s.slots, s.group))
    out = {"group": s.group, "prompt_tokens": len(prompt), "image_tokens": prompt.count(model.spec.image_token_id)}
    for mode, reqs in (("ours", [Request(prompt, images, n=s.group, sampling=SAMPLED, max_new_tokens=8)]),
                       ("ours_copies", [Request(prompt, images, sampling=SAMPLED, max_new_tokens=8)
                                        for _ in range(s.group)])):
        before = engine.metrics()
        for r in reqs:
            engine.submit(r)
        done = engine.run()
        d = delta(before, engine.metrics())
        out[mode] = {"prefill_calls": d["prefill_calls"], "images_encoded": d["images_encoded"],
                     "samples": sum(len(c.samples) for c in done)}
    log(f"  group of {s.group}: ours {out['ours']}, separate requests {out['ours_copies']}")
    return out


@nnx.jit
def _trainer_logits(model, batch):
    return model(batch)["logits"]


def trainer_logprobs(model, prompt, tokens, images=None, width: int | None = None) -> np.ndarray:
    """log_softmax of the trainer's full forward over prompt + tokens, at each of `tokens`."""
    seq = list(prompt) + list(tokens)
    width = width or 1 << (len(seq) - 1).bit_length()
    row = np.zeros((1, width), np.int32)
    row[0, :len(seq)] = seq
    batch = {"tokens": jnp.asarray(row), "segment_ids": jnp.asarray((np.arange(width) < len(seq))[None], jnp.int32)}
    batch.update({k: jnp.asarray(v) for k, v in (images or {}).items()})
    logp = np.asarray(jax.nn.log_softmax(_trainer_logits(model, batch)[0].astype(jnp.float32), axis=-1))
    at = np.arange(len(prompt) - 1, len(seq) - 1)
    return logp[at, np.asarray(tokens, np.int64)]


def measure_logprobs(model, s: Settings, prompts, rng, tunix_runner, log) -> dict:
    """5. max |logp_raw - trainer| over the sampled tokens of text prompts and of G samples of an image
    prompt; for tunix, over its greedy logprobs of the text prompts (tunix's logprobs are of the
    tempered distribution, equal to the raw ones only when greedy and nothing is banned)."""
    image, images = image_prompt(model.spec, s.image_size, rng)
    engine = make_engine(model, s, s.capacities[0], slots=max(s.slots, 2))
    new = s.logprob_new_tokens
    ids = [engine.submit(Request(p, sampling=SAMPLED, max_new_tokens=new)) for p in prompts]
    ids.append(engine.submit(Request(image, images, n=2, sampling=SAMPLED, max_new_tokens=new)))
    done = {c.id: c for c in engine.run()}
    width = 1 << (max(len(p) for p in prompts + [image]) + new - 1).bit_length()
    gaps, count = [], 0
    for rid, prompt in zip(ids, prompts + [image]):
        for smp in done[rid].samples:
            ref = trainer_logprobs(model, prompt, smp.tokens, images if prompt is image else None, width)
            gaps.append(float(np.max(np.abs(np.asarray(smp.logp_raw) - ref))))
            count += len(smp.tokens)
    out = {"dtype": str(np.dtype(model.spec.backbone.dtype)), "ours": {"max_abs": max(gaps), "tokens": count},
           "tunix": None}
    if tunix_runner is not None:
        res = tunix_runner(prompts, new, GREEDY, logprobs=True, ban=False)
        greedy = Engine(model, max_slots=len(prompts), max_seq_len=s.capacities[0], page_size=s.page_size,
                        max_chunk=s.max_chunk, steps=s.steps)
        ours = {c.id: c.samples[0].tokens for c in run_requests(greedy, prompts, GREEDY, new)}
        t_gaps, same, t_count = [], 0, 0
        for i, (prompt, toks, lps) in enumerate(zip(prompts, res.tokens, res.logprobs)):
            toks = [int(t) for t in toks]
            ref = trainer_logprobs(model, prompt, toks, None, width)
            t_gaps.append(float(np.max(np.abs(np.asarray(lps, np.float32) - ref))) if toks else 0.0)
            t_count += len(toks)
            same += toks == ours[i]
        out["tunix"] = {"max_abs": max(t_gaps), "tokens": t_count, "greedy_rows_equal_ours": int(same),
                        "rows": len(prompts)}
    log(f"  logprob gap: ours {out['ours']}, tunix {out['tunix']}")
    return out


def run_bench(model: GLM5V, s: Settings, *, use_tunix: bool = True, log: Callable[[str], None] = print) -> dict:
    """Every measurement on `model`; tunix's columns when `use_tunix` and tunix imports."""
    version = tunix_version() if use_tunix else None
    tunix = version is not None
    tunix_status = f"google-tunix {version}" if tunix else ("not installed" if use_tunix else "skipped (--no_tunix)")
    rng = np.random.default_rng(s.seed)
    prompts = text_prompts(model.spec, s.slots, s.prompt_len, rng)
    log(f"tunix: {tunix_status}")
    t0 = time.perf_counter()
    result = {"tunix": tunix_status, "settings": dataclasses.asdict(s)}
    result["compiles"] = measure_compiles(model, s, prompts, tunix, log)
    result["capacity"] = measure_capacity(model, s, prompts, tunix, log)
    batch_prompts = text_prompts(model.spec, s.requests, s.prompt_len, rng)
    result["batching"] = measure_batching(model, s, batch_prompts, lognormal_lengths(s, rng), log)
    result["group"] = measure_group(model, s, rng, log)
    runner = TunixRunner(model, s.capacities[0], s.max_chunk) if tunix else None
    result["logprobs"] = measure_logprobs(model, s, prompts[:4], rng, runner, log)
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def summary_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(measurement, goal, ours, met, tunix) per line of the summary table."""
    na = r["tunix"] if not r["tunix"].startswith("google-tunix") else None
    c, cap, b, g, lp = r["compiles"], r["capacity"], r["batching"], r["group"], r["logprobs"]
    changed = c["calls"].index("temperature/top_k/top_p changed")
    greedy = c["calls"].index("sampled -> greedy")
    tunix_group = f"{g['group']} / {g['group']} (G rows, no group forking)" if not na else na

    def t(v):
        return na if na else v

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    ratio = cap["ours_ratio"]
    return [
        ("compiles when only temperature/top_k/top_p change", "0 (tunix reported 2)", str(c["ours"][changed]),
         met(c["ours"][changed] == 0), t(str(c["tunix"][changed]) if c["tunix"] else "")),
        ("compiles, sampled -> greedy", "0", str(c["ours"][greedy]), met(c["ours"][greedy] == 0),
         t(str(c["tunix"][greedy]) if c["tunix"] else "")),
        (f"decode time, capacity {cap['capacities'][1]} / {cap['capacities'][0]}", "<= 1.3x (tunix reported 3.4x)",
         f"{_x(ratio)} ({_x(cap['ours_small_pool_ratio'])} with the small pool)", met(ratio <= 1.3),
         t(_x(cap["tunix_ratio"]))),
        ("useful slot-steps, lognormal lengths", ">= 0.8", f"{b['continuous']['useful_slot_fraction']:.3f}",
         met(b["continuous"]["useful_slot_fraction"] >= 0.8), t("no continuous batching")),
        ("tokens/s, continuous / static batching", ">= 2x", _x(b["speedup"]), met(b["speedup"] >= 2),
         t("static only (one batch per call)")),
        (f"prefill calls / images encoded, group of G={g['group']}", "1 / 1",
         f"{g['ours']['prefill_calls']} / {g['ours']['images_encoded']}",
         met(g["ours"]["prefill_calls"] == 1 and g["ours"]["images_encoded"] == 1), tunix_group),
        (f"max abs(logp_raw - trainer log_softmax), {lp['dtype']}", "<= 1e-5", f"{lp['ours']['max_abs']:.2e}",
         met(lp["ours"]["max_abs"] <= 1e-5 or lp["dtype"] != "float32"),
         t(f"{lp['tunix']['max_abs']:.2e} (greedy)" if lp["tunix"] else "")),
    ]


def _names(c: dict, i: int) -> str:
    """tunix's compiled functions of call i, briefly (a first call compiles many eager ops)."""
    names = (c.get("tunix_names") or [[]] * (i + 1))[i]
    return ", ".join(f"`{n}`" for n in names) if 0 < len(names) <= 4 else (f"{len(names)} functions" if names else "")


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "|---" * len(head) + "|"
    return ["| " + " | ".join(head) + " |", align] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def _section_compiles(r: dict) -> list[str]:
    s, c = r["settings"], r["compiles"]
    return ["## 1. Compiles per call", "",
            f"{s['slots']} text prompts of {s['prompt_len'][0]}-{s['prompt_len'][1]} tokens, "
            f"{s['compile_new_tokens']} new tokens, no stop ids (every call has the same shapes); jax compile "
            f"events (`{COMPILE_EVENT}`) during each call, in this order.", "",
            *_table(["call", "ours", "tunix", "tunix: what compiled"],
                    [[name, c["ours"][i], c["tunix"][i] if c["tunix"] else r["tunix"], _names(c, i)]
                     for i, name in enumerate(c["calls"])], "|---|---:|---:|---|")]


def _section_capacity(r: dict) -> list[str]:
    s, cap = r["settings"], r["capacity"]
    small, large = cap["capacities"]

    def row(who, capacity, x, cache):
        return [who, capacity, cache, f"{x['decode_s']:.3f}", f"{x['total_s']:.3f}",
                f"{x['decode_s'] / x['tokens'] * 1e3:.3f}"]
    rows = [row("ours", c, x, f"{x['num_pages']} pages") for c, x in zip(cap["capacities"], cap["ours"])]
    rows.append(row("ours, small pool", large, cap["ours_small_pool"], f"{cap['ours_small_pool']['num_pages']} pages"))
    rows += ([row("tunix", c, x, f"dense {cap['rows']} x {c}") for c, x in zip(cap["capacities"], cap["tunix"])]
             if cap["tunix"] else [["tunix", "–", "", r["tunix"], "", ""]])
    pool_bound = cap["ours_ratio"] > 1.3 >= cap["ours_small_pool_ratio"]
    return ["## 2. Decode time vs cache capacity", "",
            f"{cap['rows']} rows, {cap['new_tokens']} new tokens each (sampled at temperature 1, nothing stops "
            f"early); best of {s['repeats']} after a warm-up call. decode s: the time inside the decode calls (ours: "
            "the engine's decode calls of `steps` tokens each, host work included; tunix: its jitted decode loop); "
            "total s: the whole call, prefill included. Ours at the large capacity twice: with the engine's default "
            f"page pool (slots x capacity) and with the small capacity's pool (`num_pages`; {small} tokens per "
            "sequence would fit in it, these sequences need far fewer).", "",
            *_table(["sampler", "capacity", "KV cache", "decode s", "total s", "decode ms / token"], rows,
                    "|---|---:|---|---:|---:|---:|"), "",
            f"Ratio {large} / {small}: ours {_x(cap['ours_ratio'])} with the default pool, "
            f"{_x(cap['ours_small_pool_ratio'])} with the small pool; tunix "
            f"{_x(cap['tunix_ratio']) if cap['tunix'] else r['tunix']}."
            + (" Our decode time follows the size of the page pool, not the capacity." if pool_bound else "")]


def _section_batching(r: dict) -> list[str]:
    s, b = r["settings"], r["batching"]
    n = b["lengths"]
    rows = [[mode, f"{b[mode]['useful_slot_fraction']:.3f}", b[mode]["decode_steps"], b[mode]["prefill_calls"],
             b[mode]["tokens"], f"{b[mode]['wall_s']:.2f}", f"{b[mode]['tokens_per_s']:.0f}", b[mode]["compiles"]]
            for mode in ("continuous", "static")]
    rows += [[f"continuous, {label}", f"{b['continuous'][key]['useful_slot_fraction']:.3f}",
              b["continuous"][key]["decode_steps"], "", "", "", "", ""]
             for key, label in (("while_queued", "until the last request is admitted"), ("drain", "drain after it"))
             if key in b["continuous"]]
    return ["## 3. Continuous vs static batching, lognormal response lengths", "",
            f"{b['requests']} text requests on {b['slots']} slots ({b['steps_per_call']} decode steps per call); "
            f"max_new_tokens per request drawn lognormal (median {s['length_median']:g}, sigma {n['sigma']}, "
            f"clipped to [1, {s['length_max']}]; drawn: median {n['median']:g}, mean {n['mean']:.1f}, max "
            f"{n['max']}); no stop ids. Static: {b['slots']} requests submitted, `run()` until the longest ends, "
            "then the next batch, every decode step computing the whole batch (what a sampler without continuous "
            "batching, tunix's included, does: `decode_row_buckets=1`). Continuous: the engine's defaults (slots "
            "refilled as requests end; the live slots packed into 8, 4 or 2 rows). Warmed-up engines, best of "
            f"{s['repeats']} (alternating); compiles while timed are counted.", "",
            *_table(["mode", "useful slot-steps", "decode steps", "prefill calls", "tokens", "wall s", "tokens/s",
                     "compiles"], rows, "|---|---:|---:|---:|---:|---:|---:|---:|"), "",
            f"Continuous / static tokens/s: {_x(b['speedup'])}."]


def _section_group(r: dict) -> list[str]:
    g = r["group"]
    tunix = ([f"1 call over {g['group']} rows", g["group"], g["group"]] if r["tunix"].startswith("google-tunix")
             else [r["tunix"], "", ""])
    return [f"## 4. A group of G={g['group']} samples of an image prompt", "",
            f"Prompt: {g['prompt_tokens']} tokens, {g['image_tokens']} of them `<|image|>` (one image). Ours: one "
            f"request with n={g['group']} (the other samples fork the prompt's pages), and the same G samples as G "
            "separate requests. tunix: its `Sampler` has no n / group argument, so G samples of a prompt are G "
            "batch rows: its one prefill call runs the prompt G times, and a VLM under it (e.g. tunix's Gemma 3, "
            "`images` per row) encodes the image G times (counted from its API; our adapter is text only).", "",
            *_table(["sampler", "prefill calls", "images encoded", "samples"],
                    [["ours, n=G", *(g["ours"][k] for k in ("prefill_calls", "images_encoded", "samples"))],
                     ["ours, G requests", *(g["ours_copies"][k] for k in ("prefill_calls", "images_encoded",
                                                                         "samples"))],
                     ["tunix", *tunix]], "|---|---:|---:|---:|")]


def _section_logprobs(r: dict) -> list[str]:
    lp = r["logprobs"]
    rows = [["ours", f"{lp['ours']['max_abs']:.2e}", lp["ours"]["tokens"], ""]]
    t = lp["tunix"]
    rows.append(["tunix", f"{t['max_abs']:.2e}", t["tokens"],
                 f"greedy tokens equal ours in {t['greedy_rows_equal_ours']} / {t['rows']} rows"] if t
                else ["tunix", r["tunix"], "", ""])
    return ["## 5. Engine-vs-trainer logprob gap", "",
            "max abs(logp_raw - log_softmax of the trainer's full forward) over every generated token; ours: "
            f"{lp['ours']['tokens']} sampled tokens of 4 text prompts and 2 samples of an image prompt; tunix: its "
            "greedy logprobs of the same text prompts (its sampled logprobs are of the tempered distribution; "
            "greedy, with nothing banned, they are the raw ones).", "",
            *_table(["sampler", "max abs gap", "tokens", "note"], rows, "|---|---:|---:|---|")]


def report(r: dict) -> str:
    m = r["meta"]
    out = [f"# Generation: our engine vs tunix's Sampler on {m['device_kind']} ({m['preset']}, {m['dtype']})", "",
           f"{m['date']}, commit {m.get('commit', 'unknown')}, jax {m['jax']}, flax {m['flax']}, Python "
           f"{m['python']}, {m['host']}; "
           f"tunix: {r['tunix']}. Command: `python experiments/bench_generate.py {' '.join(m['argv'])}` "
           f"({r['wall_s']:.0f} s). Model: `configs/vlm_pretrain.py:{m['preset']}` ({m['params'] / 1e6:.1f}M "
           f"parameters, random weights), {m['dtype']}. tunix runs the same weights through `TunixAdapter` "
           "(see the bench's docstring).", "",
           *_table(["measurement", "goal", "ours", "met", "tunix Sampler (same weights)"],
                   [list(row) for row in summary_rows(r)], "|---|---|---|---|---|")]
    for section in (_section_compiles, _section_capacity, _section_batching, _section_group, _section_logprobs):
        out += ["", *section(r)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def load_config(preset: str, dtype: str):
    """`configs/vlm_pretrain.py:<preset>,dtype=<dtype>`, loaded by path."""
    path = ROOT / "configs" / "vlm_pretrain.py"
    spec = importlib.util.spec_from_file_location("glm5v_configs.vlm_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.get_config(f"{preset},dtype={dtype}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(x) for x in text.split(","))
    return a, b


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="configs/vlm_pretrain.py preset (tiny, 0p5b, 0p5b_moe)")
    ap.add_argument("--dtype", default="float32", help="compute dtype (the logprob goal is for float32)")
    ap.add_argument("--slots", type=int, default=None, help="engine slots = tunix batch rows (default 8)")
    ap.add_argument("--requests", type=int, default=None, help="requests of measurement 3 (default 64)")
    ap.add_argument("--capacities", type=_pair, default=None, help="small,large cache capacity (default 512,4096)")
    ap.add_argument("--new_tokens", type=int, default=None, help="new tokens per row of measurement 2 (default 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of measurement 2 (default 2)")
    ap.add_argument("--no_tunix", action="store_true", help="leave tunix out even when installed")
    ap.add_argument("--smoke", action="store_true", help="tiny workload (SMOKE settings)")
    ap.add_argument("--out_dir", default=str(RESULTS), help="where the .md and .json go ('' to skip writing)")
    args = ap.parse_args(argv)
    base = SMOKE if args.smoke else Settings()
    changes = {k: v for k, v in (("slots", args.slots), ("requests", args.requests), ("capacities", args.capacities),
                                 ("capacity_new_tokens", args.new_tokens), ("repeats", args.repeats)) if v}
    args.settings = dataclasses.replace(base, **changes)
    return args


def meta(argv, preset: str, dtype: str, model) -> dict:
    import flax
    dev = jax.devices()[0]
    plat = dev.platform
    kind = getattr(dev, "device_kind", plat) or plat
    return dict(device_kind=kind if plat != "cpu" else f"CPU ({_cores()} cores)", platform=plat, preset=preset,
                dtype=dtype, jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
                host=f"{platform.machine()} {platform.system()}", argv=list(argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                params=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))), commit=_commit())


def _commit() -> str:
    """The repository's commit (with "+dirty" when glm5v_jax/ has uncommitted changes), or "unknown"."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "glm5v_jax"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def write(result: dict, out_dir: str, log: Callable[[str], None] = print) -> list[str]:
    """The .md and .json of `result` in `out_dir`: generate_<cpu | device kind>[_<preset>][_smoke]."""
    m = result["meta"]
    name = "cpu" if m["platform"] == "cpu" else slug(m["device_kind"])
    stem = Path(out_dir) / "_".join(["generate", name] + ([m["preset"]] if m["preset"] != "tiny" else [])
                                    + (["smoke"] if m.get("smoke") else []))
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = [str(stem) + ".md", str(stem) + ".json"]
    Path(files[0]).write_text(report(result) + "\n")
    Path(files[1]).write_text(json.dumps(result, indent=1, default=json_default) + "\n")
    log(f"wrote {files[0]} and .json")
    return files




def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = load_config(args.preset, args.dtype)
    model = GLM5V(vlm_spec_from_config(cfg.model), rngs=nnx.Rngs(0))
    info = meta(argv, args.preset, args.dtype, model)
    info["smoke"] = args.smoke
    log(f"bench_generate on {info['device_kind']}: {args.preset} ({info['params'] / 1e6:.1f}M), {args.dtype}")
    result = run_bench(model, args.settings, use_tunix=not args.no_tunix, log=log)
    result["meta"] = info
    log(report(result))
    if args.out_dir:
        result["files"] = write(result, args.out_dir, log)
    return result


if __name__ == "__main__":
    main()
