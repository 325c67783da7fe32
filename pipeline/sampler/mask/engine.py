"""The mask-diffusion sampler (LLaDA's `generate` or Dream's `diffusion_generate`, Fast-dLLM's threshold
decoding and block caches) with continuous batching.

For each row, a sequence of prompt + max_new_tokens MASK tokens at positions 0..P+G-1; blocks of
`block_length` are decoded left to right. Each step:
  1. the model runs over a window of the row (its hidden states are read at the current block only):
       cache=none    the whole sequence, every step (the exact path: LLaDA's `generate`);
       cache=prefix  the whole sequence at a block's first step, then the block and everything after it,
                     attending to the prefix's keys/values cached at the block start (Fast-dLLM prefix cache);
       cache=dual    the whole sequence at a block's first step, then the block only, attending to the cached
                     prefix and masked suffix (Fast-dLLM dual cache);
     with classifier-free guidance, an unconditional twin (prompt masked) runs in the same call;
  2. decide.py commits predictions of the block (LLaDA's or Dream's schedule, or a threshold), optionally
     masking low-probability committed tokens again;
  3. the block is complete when nothing in it is masked; the row is done after its last block, or as soon as
     it holds an EOS before which everything is decided and final: its completion can no longer change, so the
     rest of its blocks (EOS padding, for an Instruct model) are never computed.

Rows live in slots 0..A-1 (a leaving row's slot is refilled by the last one, so reads are views); a finished
row leaves at once and a queued row takes its slot (`batching="static"` keeps finished rows computed until
their whole batch is done, the reference's schedule). One host synchronisation per step reads the per-row
flags (a second one, on steps where rows finish, reads their tokens). Randomness is keyed by (seed, row id, completion, block, step, position[, token]), so a row's completion does not
depend on its batch. The sampler knows nothing of Ray, Hydra or files.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.kernels import rng
from pipeline.kernels.backend import check_backend, resolve_backend
from pipeline.models.bidirectional import TOKEN_PAD, BidirectionalLM
from pipeline.sampler.engine import Request, Result, round_up
from pipeline.sampler.feed import Feed, ListFeed, check_prompt
from pipeline.sampler.mask.decide import StepKeys, decide, eos_stop
from pipeline.sampler.mask.settings import MaskSettings

logger = logging.getLogger(__name__)

# float32 logits of the rows whose vocabulary head and decisions run together (MaskDiffusionSampler._decide);
# the decisions' intermediates are about 12 times that (benchmarks/bench_mask_decide.py)
DECIDE_BYTES = 256 << 20


@dataclass
class MaskSamplerStats:
    steps: int = 0  # sampler steps: one decision for every row of the batch (one or two forwards, by window)
    step_rows: int = 0  # rows in the batch at each step, summed (static batching's finished rows too)
    forward_calls: int = 0
    row_forwards: int = 0  # rows per call, summed (guidance twins and static batching's finished rows too)
    query_tokens: int = 0  # tokens computed through the layers (padding included)
    attention_pairs: int = 0  # query x key products per head and layer (padding included)
    head_tokens: int = 0  # positions through the vocabulary head
    valid_query_tokens: int = 0  # the same without padding: the algorithm's work
    valid_attention_pairs: int = 0

    def flops(self, model: BidirectionalLM, *, padded: bool = True) -> float:
        """Forward FLOPs: dense products, attention (QK^T and AV) and the head; `padded`: as computed (padding
        to TOKEN_PAD and to the batch's longest window included), else the algorithm's own work."""
        spec = model.spec
        tokens = self.query_tokens if padded else self.valid_query_tokens
        pairs = self.attention_pairs if padded else self.valid_attention_pairs
        attention = 4 * spec.num_layers * spec.num_heads * spec.head_dim * pairs
        head = 2 * spec.hidden_size * spec.vocab_size * self.head_tokens
        return 2.0 * spec.linear_params() * tokens + attention + head


@dataclass
class _Row:
    request: Request
    order: int
    k0: int
    k1: int
    prompt_len: int
    block: int = 0
    step: int = 0  # steps taken in the current block
    steps_total: int = 0
    refresh: bool = True  # the next forward recomputes the whole sequence (a block's first step)
    finished: bool = False
    eos: int | None = None  # position of the EOS that ended the row
    stopped: bool = False  # ended by a stop string (pipeline/sampler/stop.py)
    tokens: list[int] = field(default_factory=list)
    drafts: list[list[list[int]]] | None = None


class MaskDiffusionSampler:
    """Generates completions for token-id prompts with a mask-diffusion model (`BidirectionalLM`).

    `max_batch` rows are decoded together; `max_prompt_tokens` is the longest prompt a row may have (it sizes
    the per-slot state and, with caching, the KV cache); `decide_bytes` bounds the float32 logits of the rows
    whose vocabulary head and decisions run at once (`_decide`)."""

    def __init__(
        self,
        model: BidirectionalLM,
        settings: MaskSettings,
        *,
        max_batch: int = 8,
        max_prompt_tokens: int = 512,
        backend: str = "auto",
        decide_bytes: int = DECIDE_BYTES,
        stop: Callable[[list[int]], int | None] | None = None,
    ) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch={max_batch} must be positive")
        if decide_bytes <= 0:
            raise ValueError(f"decide_bytes={decide_bytes} must be positive")
        check_backend(backend)
        if settings.mask_token_id != model.mask_token_id:
            raise ValueError(
                f"settings.mask_token_id={settings.mask_token_id} differs from the model's {model.mask_token_id}"
            )
        self.model = model
        self.settings = settings
        self.max_batch = max_batch
        self.max_prompt_tokens = max_prompt_tokens
        self.decide_bytes = decide_bytes
        self.stop = stop  # called with a row's tokens as each of its blocks completes (stop strings)
        self.device = model.device
        # The cached forward's attention follows the sampler's kernel choice (the rest of the step is torch).
        # The exact path (cache none) has no cached forward: torch whatever the choice, and reported so (the
        # worker's "ready ... (cuda, torch kernels, ...)" line, stats.json's workers).
        chosen = resolve_backend(backend, self.device.type)
        self.backend = chosen if settings.cache != "none" else "torch"
        model.set_backend(self.backend)
        self.shift = 1 if model.spec.shift_logits else 0
        self.width = round_up(max_prompt_tokens + settings.max_new_tokens, TOKEN_PAD)
        self.guided = settings.cfg_scale > 0
        self.stats = MaskSamplerStats()
        self._eos = torch.tensor(sorted(settings.eos_token_ids), dtype=torch.long, device=self.device)
        self._tokens: torch.Tensor | None = None  # [S, width] each row's prompt + generated region
        self._cache = None

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        *,
        batching: str = "continuous",
        on_result: Callable[[Result], None] | None = None,
    ) -> list[Result]:
        """Results in request order. `on_result` is called as each row finishes."""
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching={batching!r} is not one of continuous, static")
        for req in requests:
            check_prompt(req, self.max_prompt_tokens)
        results: list[Result | None] = [None] * len(requests)

        def emit(row: _Row, result: Result) -> None:
            results[row.order] = result
            if on_result is not None:
                on_result(result)

        self._run(ListFeed(requests), emit, static=batching == "static")
        return [r for r in results if r is not None]

    @torch.no_grad()
    def serve(self, feed: Feed, on_result: Callable[[Request, Result], None]) -> None:
        """Continuous batching over the rows `feed` gives (pipeline/sampler/feed.py) until it is closed and
        every row taken has finished; `on_result(request, result)` is called as each row finishes."""
        self._run(feed, lambda row, result: on_result(row.request, result), static=False)

    def _run(self, feed: Feed, emit: Callable[[_Row, Result], None], *, static: bool) -> None:
        self._ensure_storage()
        queue: deque[_Row] = deque()
        rows: list[_Row] = []  # rows[i] lives in slot i
        taken = 0
        while True:
            if not static or not rows:  # static: a new batch only once the last one is done
                for req in feed.pull(self.max_batch - len(rows) - len(queue), wait=not rows):
                    check_prompt(req, self.max_prompt_tokens)
                    queue.append(self._new_row(req, taken))
                    taken += 1
                self._admit(rows, queue)
            if not rows:
                return
            for row in self._step(rows):
                emit(row, self._result(row))
            if not static:
                self._compact(rows, {i for i, r in enumerate(rows) if r.finished})
            elif all(r.finished for r in rows):
                rows.clear()

    # ---------------------------------------------------------------------------------------- storage
    def _ensure_storage(self) -> None:
        if self._tokens is not None:
            return
        self._tokens = torch.full(
            (self.max_batch, self.width), self.settings.pad_token_id, dtype=torch.long, device=self.device
        )
        if self.settings.cache != "none":
            slots = self.max_batch * (2 if self.guided else 1)
            self._cache = self.model.new_cache(slots, self.width + 1)  # + the scratch column
            logger.debug("mask sampler: %d slots, KV cache %.1f MiB", slots, self._cache.nbytes() / 2**20)

    def _new_row(self, req: Request, order: int) -> _Row:
        k0, k1 = rng.row_key(self.settings.seed, req.row_id, req.completion)
        drafts = [] if self.settings.record_drafts else None
        return _Row(req, order, k0, k1, prompt_len=len(req.prompt_ids), drafts=drafts)

    def _admit(self, rows: list[_Row], queue: deque) -> None:
        s = self.settings
        while queue and len(rows) < self.max_batch:
            row = queue.popleft()
            sequence = list(row.request.prompt_ids) + [s.mask_token_id] * s.max_new_tokens
            self._tokens[len(rows)].fill_(s.pad_token_id)
            self._tokens[len(rows), : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            rows.append(row)

    def _compact(self, rows: list[_Row], leaving: set[int]) -> None:
        """Removes leaving rows; the last surviving rows move into the freed slots."""
        if not leaving:
            return
        survivors = [i for i in range(len(rows)) if i not in leaving]
        keep = len(survivors)
        new_rows = list(rows)
        for hole, src in zip(
            sorted(i for i in leaving if i < keep), [i for i in survivors if i >= keep], strict=True
        ):
            self._tokens[hole] = self._tokens[src]
            if self._cache is not None:
                self._cache.move(src, hole)
                if self.guided:
                    self._cache.move(self.max_batch + src, self.max_batch + hole)
            new_rows[hole] = rows[src]
        rows[:] = new_rows[:keep]

    # ------------------------------------------------------------------------------------------- step
    def _window(self, row: _Row) -> tuple[int, int]:
        """[start, end) of the row's sequence recomputed this step."""
        s = self.settings
        total = row.prompt_len + s.max_new_tokens
        if s.cache == "none" or row.refresh:
            return 0, total
        block_start = row.prompt_len + row.block * s.block_length
        end = block_start + s.block_length if s.cache == "dual" else total
        return block_start - self.shift, end  # Dream reads position p's logits at p - 1

    def _step(self, rows: list[_Row]) -> list[_Row]:
        """One forward and decision for every row; returns the rows that finished at this step."""
        self.stats.steps += 1
        self.stats.step_rows += len(rows)
        windows = [self._window(r) for r in rows]
        full = [i for i, w in enumerate(windows) if w[0] == 0]
        partial = [i for i, w in enumerate(windows) if w[0] != 0]
        groups = [g for g in (full, partial) if g]
        flags = [self._run_group(rows, g, windows, prefix=len(g) == len(rows)) for g in groups]
        # the one host synchronisation of the step: [block done, EOS stop, EOS position] per row
        host = dict(zip([i for g in groups for i in g], torch.cat(flags).tolist(), strict=True))
        drafts = self._generated(rows, range(len(rows))).tolist() if self.settings.record_drafts else None
        finished, completed = [], []  # completed: rows whose block is complete, for the stop strings
        for i, row in enumerate(rows):
            if row.finished:  # static batching: computed with its batch, not advanced
                continue
            block_done, eos_done, eos_pos = host[i]
            if block_done or eos_done:
                completed.append(i)
            if drafts is not None:
                if row.step == 0:
                    row.drafts.append([])
                row.drafts[-1].append(drafts[i])
            row.steps_total += 1
            row.step += 1
            row.refresh = False
            if eos_done:
                row.finished, row.eos = True, eos_pos
            elif block_done and row.block + 1 == self.settings.num_blocks:
                row.finished = True
            elif block_done:
                row.block, row.step, row.refresh = row.block + 1, 0, True
            if row.finished:
                finished.append(i)
        if self.stop is not None and completed:
            self._check_stops(rows, completed, finished)
        if finished:
            for i, generated in zip(finished, self._generated(rows, finished).tolist(), strict=True):
                if not rows[i].stopped:
                    rows[i].tokens = generated if rows[i].eos is None else generated[: rows[i].eos]
        return [rows[i] for i in finished]

    def _check_stops(self, rows: list[_Row], completed: list[int], finished: list[int]) -> None:
        """Rows whose text, up to their last complete block (or EOS), holds a stop string end there."""
        s = self.settings
        for i, generated in zip(completed, self._generated(rows, completed).tolist(), strict=True):
            row = rows[i]
            if row.eos is not None:
                end = row.eos
            else:  # blocks complete so far: the row moved on to block `row.block`, or finished its last
                end = (s.num_blocks if row.finished else row.block) * s.block_length
            keep = self.stop(generated[: min(end, s.max_new_tokens)])
            if keep is None:
                continue
            row.tokens, row.stopped = generated[:keep], True
            if not row.finished:  # it had moved on to the next block, which it now never runs
                row.finished, row.block = True, row.block - 1
                finished.append(i)
        finished.sort()

    def _generated(self, rows: list[_Row], indices) -> torch.Tensor:
        """[n, G] generated regions of the rows in slots `indices`."""
        indices = list(indices)
        prompt = torch.tensor([rows[i].prompt_len for i in indices], dtype=torch.long, device=self.device)
        columns = prompt[:, None] + torch.arange(self.settings.max_new_tokens, device=self.device)
        return self._tokens[torch.tensor(indices, device=self.device)].gather(1, columns)

    def _run_group(
        self, rows: list[_Row], group: list[int], windows: list[tuple[int, int]], *, prefix: bool
    ) -> torch.Tensor:
        """Forward and decisions for the rows in slots `group` (sorted; `prefix`: exactly 0..A-1).
        Returns [n, 3] int64 device flags: block done, EOS stop, EOS position."""
        s, dev = self.settings, self.device
        members = [rows[i] for i in group]
        slots = torch.tensor(group, dtype=torch.long, device=dev)
        start = torch.tensor([windows[i][0] for i in group], dtype=torch.long, device=dev)
        end = torch.tensor([windows[i][1] for i in group], dtype=torch.long, device=dev)
        width = round_up(max(windows[i][1] - windows[i][0] for i in group), TOKEN_PAD)
        prompt = torch.tensor([r.prompt_len for r in members], dtype=torch.long, device=dev)
        block = torch.tensor([r.block for r in members], dtype=torch.long, device=dev)
        step = torch.tensor([r.step for r in members], dtype=torch.long, device=dev)
        block_start = prompt + block * s.block_length  # [n]
        tokens_all = self._tokens[: len(rows)] if prefix else self._tokens[slots]

        positions = start[:, None] + torch.arange(width, device=dev)  # [n, W]
        valid = positions < end[:, None]
        tokens = tokens_all.gather(1, positions.clamp(max=self.width - 1))
        rel = (block_start - self.shift - start)[:, None] + torch.arange(s.block_length, device=dev)  # [n, K]
        total = prompt + s.max_new_tokens
        cache_slots = slots
        if self.guided:  # the unconditional twin: the same sequence with its prompt masked
            uncond = torch.where(positions < prompt[:, None], s.mask_token_id, tokens)
            tokens, positions, valid = torch.cat([tokens, uncond]), positions.repeat(2, 1), valid.repeat(2, 1)
            rel, total, cache_slots = (
                rel.repeat(2, 1),
                total.repeat(2),
                torch.cat([slots, slots + self.max_batch]),
            )
        kwargs = {}
        key_span = max(r.prompt_len for r in members) + s.max_new_tokens
        if self._cache is not None:
            kwargs = dict(
                cache=self._cache,
                slots=None if prefix and not self.guided else cache_slots,
                key_length=total,
                key_span=key_span,
            )
        hidden = self.model(tokens, positions, valid, **kwargs)  # [n(x2), W, D]
        hidden = hidden.gather(1, rel[..., None].expand(-1, -1, hidden.shape[-1]))  # [n(x2), K, D]
        rows_run = tokens.shape[0]
        self.stats.forward_calls += 1
        self.stats.row_forwards += rows_run
        self.stats.query_tokens += rows_run * width
        self.stats.attention_pairs += rows_run * width * (key_span if self._cache is not None else width)
        self.stats.head_tokens += rows_run * s.block_length
        copies = 2 if self.guided else 1
        for i, member in zip(group, members, strict=True):
            lo, hi = windows[i]
            keys_seen = member.prompt_len + s.max_new_tokens if self._cache is not None else hi - lo
            self.stats.valid_query_tokens += copies * (hi - lo)
            self.stats.valid_attention_pairs += copies * (hi - lo) * keys_seen

        columns = block_start[:, None] + torch.arange(s.block_length, device=dev)  # [n, K]
        keys = None
        if s.draws_random_numbers:
            keys = StepKeys(
                k0=torch.tensor([r.k0 for r in members], dtype=torch.long, device=dev),
                k1=torch.tensor([r.k1 for r in members], dtype=torch.long, device=dev),
                block=block,
                step=step,
                gen_positions=columns - prompt[:, None],
            )
        decided = self._decide(hidden, tokens_all.gather(1, columns), step, keys)
        self._tokens[slots[:, None], columns] = decided
        block_done = ~(decided == s.mask_token_id).any(-1)
        generated = self._tokens[slots].gather(
            1, prompt[:, None] + torch.arange(s.max_new_tokens, device=dev)
        )
        if s.remask_threshold > 0:  # only completed blocks are final
            final_end = (block + block_done.long()) * s.block_length
        else:
            final_end = torch.full_like(block, s.max_new_tokens)
        stop, position = eos_stop(generated, mask_id=s.mask_token_id, eos_ids=self._eos, final_end=final_end)
        return torch.stack([block_done.long(), stop.long(), position], dim=1)

    def _decide(
        self, hidden: torch.Tensor, block: torch.Tensor, step: torch.Tensor, keys: StepKeys | None
    ) -> torch.Tensor:
        """The block tokens [n, K] after this step's decisions, from the block's hidden states [n(x2), K, D]
        (guidance: conditional rows, then their unconditional twins). The vocabulary head and the decision run
        over a few rows at a time, so that their float32 [rows, K, V] intermediates (logits, softmax, a top_p
        sort, Gumbel noise: several copies) stay within about `decide_bytes` each, whatever the batch: a
        Dream block of 512 positions over 152k tokens is 311 MB of logits per row. Rows are independent, so
        the result does not depend on the split."""
        s, n = self.settings, block.shape[0]
        chunk = self.decide_rows(block.shape[1])
        out = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            logits = self.model.logits(hidden[lo:hi])  # [rows, K, V]
            if self.guided:
                uncond = self.model.logits(hidden[n + lo : n + hi])
                logits = uncond + (s.cfg_scale + 1) * (logits - uncond)
            decision = decide(
                logits,
                block[lo:hi],
                settings=s,
                step=step[lo:hi],
                allow_remask=step[lo:hi] < s.steps_per_block - 1,
                keys=None if keys is None else keys.rows(lo, hi),
            )
            out.append(decision.tokens)
        return out[0] if len(out) == 1 else torch.cat(out)

    def decide_rows(self, positions: int) -> int:
        """Rows whose head and decisions run together (`_decide`) for a block of `positions`: their float32
        logits fit `decide_bytes` (with guidance three tensors a row: the conditional, its twin, the mix)."""
        per_row = positions * self.model.spec.vocab_size * 4 * (3 if self.guided else 1)
        return max(1, self.decide_bytes // per_row)

    def _result(self, row: _Row) -> Result:
        return Result(
            row_id=row.request.row_id,
            token_ids=row.tokens,
            finish_reason="stop" if row.stopped else "eos" if row.eos is not None else "length",
            denoising_steps=row.steps_total,
            canvases=row.block + 1,
            drafts=row.drafts,
        )
