"""The parallel diffusion sampler (DiffusionGemma's entropy-bound sampler) with continuous batching.

For each row, canvas after canvas:
  1. the causal encoder writes the prompt (or the previous canvas) into the row's KV-cache slot; what of the
     prompt another slot holds (the whole prompt, or leading blocks such as a system prompt) is copied from it;
  2. the canvas starts as uniform noise; each step the bidirectional decoder reads the slot and the canvas,
     and the vocabulary head gives per position a sampled token, the argmax and the entropy of the
     temperature-scaled distribution (linear schedule t_max -> t_min) and the self-conditioning input;
  3. entropy-bound acceptance keeps the lowest-entropy sampled tokens, the rest are re-noised;
  4. the canvas stops when its argmax is stable for `stability_threshold` steps and its mean entropy is
     below `confidence_threshold`, or after `max_denoising_steps`; its argmax is emitted;
  5. an EOS ends the row, so does `max_new_tokens`; otherwise the canvas is encoded and the next begins.

Continuous batching: rows live in KV-cache slots allocated once; a row leaves its slot the moment it
finishes and a queued row takes it, at any canvas index, so the batch stays full while work remains. Active
rows always occupy slots 0..A-1 (a leaving row's slot is refilled by moving the last one), so the decoder
reads the cache through views, not gathers. Static batching (`batching="static"`, static.py) reproduces
the reference's behaviour instead: every row of a batch runs until the slowest one finishes.

The sampler knows nothing of Ray, Hydra or files: token ids in, token ids and counters out.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.kernels import rng
from pipeline.kernels.backend import resolve_backend
from pipeline.kernels.step import denoise_step
from pipeline.kernels.vocab_head import softcap_logits, vocab_head
from pipeline.sampler.draws import GlobalDraws, KeyedDraws
from pipeline.sampler.feed import Feed, ListFeed, check_prompt
from pipeline.sampler.graphs import make_step_graphs
from pipeline.sampler.settings import SamplerSettings
from pipeline.sampler.sharing import PromptIndex, prefix_hashes

logger = logging.getLogger(__name__)

PROMPT_PAD = 16  # prompt lengths are padded to a multiple of this (see models.diffusion_gemma.TOKEN_PAD)
MAX_ADMIT_ROUNDS = 4  # an admission writes prompts in at most this many rounds (sampler._admit)
KV_LIMIT_ROUND = 256  # on CUDA, attention reads the slots up to the longest active row, rounded up to this


@dataclass
class Request:
    row_id: str
    prompt_ids: Sequence[int]
    completion: int = 0  # which of the prompt's completions: its draws are keyed by (row_id, completion)


@dataclass
class Result:
    row_id: str
    token_ids: list[int]  # the completion: EOS and everything after it removed, at most max_new_tokens
    finish_reason: str  # "eos", "length", or "stop" (a stop string: pipeline/sampler/stop.py)
    denoising_steps: int  # decoder forward passes spent on this row
    canvases: int
    drafts: list[list[list[int]]] | None = None  # per canvas, per step: the argmax canvas


@dataclass
class SamplerStats:
    decoder_row_steps: int = 0  # rows x decoder passes actually computed (padding rows included)
    decoder_calls: int = 0
    encoder_calls: int = 0
    encoder_tokens: int = 0  # padded tokens pushed through the encoder
    prompt_tokens_shared: int = 0  # prompt tokens copied from another slot (whole prompts, leading blocks)

    def add(self, other: SamplerStats) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Row:
    request: Request
    k0: int
    k1: int
    order: int
    prompt: tuple[int, ...]
    prompt_key: tuple[int, int]  # (length, hash) of the prompt: finds a slot that holds the same prompt
    prompt_blocks: list[int]  # hash of each whole PROMPT_PAD-token block with all before it: shared prefixes
    canvas: int = 0
    step: int = 0
    steps_total: int = 0
    cached: int = 0  # tokens in the row's KV-cache slot (prompt + encoded canvases)
    tokens: list[int] = field(default_factory=list)
    drafts: list[list[list[int]]] | None = None


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def finish_reason(emitted_before: int, cut: int | None, max_new_tokens: int) -> str:
    """ "eos" if the canvas's EOS (at `cut`, after `emitted_before` tokens) falls within max_new_tokens, else
    "length" (no EOS, or one in the part of the last canvas past max_new_tokens, which is cut off anyway)."""
    return "eos" if cut is not None and emitted_before + cut < max_new_tokens else "length"


class DiffusionSampler:
    """Generates completions for token-id prompts with a DiffusionGemma text model.

    `model` is a `pipeline.models.diffusion_gemma.DiffusionGemmaTextModel` (anything with its `new_cache`,
    `encode`, `denoise`, `embedding`, `softcap`, `vocab_size` and `device`). `max_batch` is the number of
    KV-cache slots, `max_prompt_tokens` the longest prompt the cache must hold. `step_graphs`: "auto" runs
    the decoder step as CUDA graphs of bucketed batch sizes on CUDA, "off" never, "eager" pads to the buckets
    without capturing (the same padding logic, testable on CPU). `share_prompts`: a prompt, or its leading blocks,
    that a slot already holds is copied from it, not encoded again (sharing.py; continuous batching only: static
    batching encodes every prompt, as the reference does). `stop` (pipeline/sampler/stop.py's StopStrings): called
    with a row's tokens as each canvas finishes; a row whose text holds a stop string ends there.
    """

    def __init__(
        self,
        model,
        settings: SamplerSettings,
        *,
        max_batch: int = 8,
        max_prompt_tokens: int = 512,
        backend: str = "auto",
        random_mode: str = "keyed",
        step_graphs: str = "auto",
        share_prompts: bool = True,
        stop: Callable[[list[int]], int | None] | None = None,
    ) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch={max_batch} must be positive")
        if random_mode not in ("keyed", "torch_global"):
            raise ValueError(f"random_mode={random_mode!r} is not one of keyed, torch_global")
        self.model = model
        self.settings = settings
        self.max_batch = max_batch
        self.max_prompt_tokens = max_prompt_tokens
        self.share_prompts = share_prompts
        self.stop = stop
        self.device = model.device
        self.backend = resolve_backend(backend, self.device.type)
        if hasattr(model, "set_backend"):  # the model's fused norms follow the sampler's kernel choice
            model.set_backend(self.backend)
        self.length = settings.canvas_length
        self.vocab_size = model.vocab_size
        self.eos = set(settings.eos_token_ids)
        self.draws = (KeyedDraws if random_mode == "keyed" else GlobalDraws)(self.vocab_size, self.length)
        # The prompt padded, every canvas, and the padding an emitted canvas is encoded with (its write runs to
        # round_up(L, PROMPT_PAD) past its start; for L < 8 that is more than the next canvas's room).
        pad = round_up(self.length, PROMPT_PAD) - self.length
        self.capacity = round_up(max_prompt_tokens, PROMPT_PAD) + settings.max_canvases * self.length + pad
        self.stats = SamplerStats()
        self._cache = None
        self._state: dict[str, torch.Tensor] = {}
        self._prompts = PromptIndex(PROMPT_PAD)  # set afresh by each continuous run
        self.graphs = make_step_graphs(self, step_graphs)

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
        for req in requests:
            check_prompt(req, self.max_prompt_tokens)
        if batching == "continuous":
            results: list[Result | None] = [None] * len(requests)

            def emit(row: _Row, result: Result) -> None:
                results[row.order] = result
                if on_result is not None:
                    on_result(result)

            self._run_continuous(ListFeed(requests), emit)
            return [r for r in results if r is not None]
        if batching == "static":
            from pipeline.sampler.static import run_static

            return run_static(self, requests, on_result)
        raise ValueError(f"batching={batching!r} is not one of continuous, static")

    @torch.no_grad()
    def serve(self, feed: Feed, on_result: Callable[[Request, Result], None]) -> None:
        """Continuous batching over the rows `feed` gives (pipeline/sampler/feed.py) until it is closed and
        every row taken has finished; `on_result(request, result)` is called as each row finishes."""
        self._run_continuous(feed, lambda row, result: on_result(row.request, result))

    # ---------------------------------------------------------------------------------------- storage
    def _ensure_storage(self) -> None:
        if self._cache is not None:
            return
        slots, length, dim = self.max_batch, self.length, self.model.hidden_size
        dev = self.device
        self._cache = self.model.new_cache(slots, self.capacity)
        # A canvas is stable once its argmax equals each of the last stability_threshold ones: never within
        # max_denoising_steps steps when the threshold is as large, so the history need not be any longer (a
        # threshold of 10**8 asked for 200 GB).
        history = min(max(self.settings.stability_threshold, 0), self.settings.max_denoising_steps)
        self._state = {
            "canvas": torch.zeros(slots, length, dtype=torch.long, device=dev),
            "argmax": torch.zeros(slots, length, dtype=torch.long, device=dev),
            "soft": torch.zeros(slots, length, dim, dtype=self.model.dtype, device=dev),
            "history": torch.full((slots, history, length), -1, dtype=torch.long, device=dev),
            "frozen": torch.zeros(slots, length, dtype=torch.bool, device=dev),
            "step": torch.zeros(slots, dtype=torch.long, device=dev),
            "canvas_idx": torch.zeros(slots, dtype=torch.long, device=dev),
            "k0": torch.zeros(slots, dtype=torch.long, device=dev),
            "k1": torch.zeros(slots, dtype=torch.long, device=dev),
        }
        logger.debug("sampler: %d slots, KV cache %.1f MiB", slots, self._cache.nbytes() / 2**20)

    def _move_slot(self, src: int, dst: int) -> None:
        self._cache.move(src, dst)
        for tensor in self._state.values():
            tensor[dst] = tensor[src]

    def _start_canvas(self, slots: torch.Tensor) -> None:
        """Fresh noise canvas, zero self-conditioning, empty history for `slots` (their canvas_idx set)."""
        st = self._state
        if self.draws.keyed:
            st["canvas"][slots] = self.draws.initial_canvas(
                st["k0"][slots], st["k1"][slots], st["canvas_idx"][slots]
            )
        else:
            st["canvas"][slots] = self.draws.initial_canvas(len(slots), self.device)
        st["argmax"][slots] = st["canvas"][slots]
        st["soft"][slots] = 0
        st["history"][slots] = -1
        st["frozen"][slots] = False
        st["step"][slots] = 0

    def kv_limit(self, longest: int) -> int | None:
        """How far into the slots attention must read, for rows caching at most `longest` tokens (canvas
        scratch included). On CUDA it is rounded up to a multiple of 256; on CPU attention always reads the
        whole capacity, so that a row's numbers never depend on the other rows of its batch."""
        if self.device.type != "cuda":
            return None
        return min(self.capacity, round_up(longest, KV_LIMIT_ROUND))

    def _encode(
        self, slots: torch.Tensor, token_rows: list[list[int]], prefix: bool, cached: list[int] | None = None
    ) -> None:
        """Encodes `token_rows` after each slot's cached tokens (`cached`: their host-side counts)."""
        width = round_up(max(len(t) for t in token_rows), PROMPT_PAD)
        tokens = torch.full((len(token_rows), width), self.settings.pad_token_id, dtype=torch.long)
        for i, row in enumerate(token_rows):
            tokens[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(t) for t in token_rows], dtype=torch.long, device=self.device)
        longest = max(cached or [0]) + width
        self.model.encode(
            self._cache,
            slots,
            tokens.to(self.device),
            lengths,
            prefix=prefix,
            kv_limit=self.kv_limit(longest),
        )
        self.stats.encoder_calls += 1
        self.stats.encoder_tokens += tokens.numel()

    # ------------------------------------------------------------------------------------------- step
    def _temperature(self, step: torch.Tensor) -> torch.Tensor:
        """Per-row temperature, computed with the reference's float32 expression over remaining steps."""
        s = self.settings
        # A row's step is below max_denoising_steps; the padding rows of a bucketed step count on, and are
        # clamped so that their temperature stays positive and their (ignored) numbers finite.
        remaining = (s.max_denoising_steps - step).clamp(min=1).to(torch.int32)
        return s.t_min + (s.t_max - s.t_min) * (remaining / s.max_denoising_steps)

    def _denoise(self, active: int, live: torch.Tensor | None = None, longest: int = 0) -> torch.Tensor:
        """One decoder step for slots 0..active-1; rows with live=False keep their state (static batching).
        `longest` is the most tokens any of the rows caches. Returns the stop flags [active] (stable and
        confident) as a device tensor. In continuous batching the step may run as a CUDA graph of a bucketed
        batch size (graphs.py); padding rows then occupy free slots and their results are ignored."""
        # The Triton canvas attention reads each row's key range itself: no read limit, so one CUDA graph per
        # batch bucket serves every prefix length.
        kv_limit = None if self.backend == "triton" else self.kv_limit(longest + self.length)
        self.stats.decoder_calls += 1
        if live is None and self.graphs is not None:
            bucket = self.graphs.bucket(active)
            self.stats.decoder_row_steps += bucket
            return self.graphs.run(active, bucket, kv_limit)
        self.stats.decoder_row_steps += active
        return self._step(active, live, kv_limit)

    def _step(self, active: int, live: torch.Tensor | None, kv_limit: int | None) -> torch.Tensor:
        """The step's tensor work only (no host synchronisation, no Python-side state), so that it can be
        captured in a CUDA graph."""
        st, s = self._state, self.settings
        slots = torch.arange(active, device=self.device)
        canvas = st["canvas"][:active]
        hidden = self.model.denoise(
            self._cache, slots, canvas, st["soft"][:active], prefix=True, kv_limit=kv_limit
        )  # [A, L, D]
        temperature = self._temperature(st["step"][:active])  # [A] float32
        embedding = self.model.embedding
        if self.draws.keyed:
            step_idx, canvas_idx = st["step"][:active], st["canvas_idx"][:active]
            k0, k1 = st["k0"][:active], st["k1"][:active]
            head = vocab_head(
                hidden.reshape(-1, hidden.shape[-1]),
                embedding,
                softcap=self.model.softcap,
                temperature=temperature.repeat_interleave(self.length),
                sample_state=self.draws.sample_state(k0, k1, canvas_idx, step_idx),
                want_soft=True,
                backend=self.backend,
            )
            sampled, argmax = head.sampled.view(active, -1), head.argmax.view(active, -1)
            entropy, soft = head.entropy.view(active, -1), head.soft.view(active, self.length, -1)
            noise = self.draws.noise(k0, k1, canvas_idx, step_idx)
        else:
            processed = softcap_logits(hidden, embedding, self.model.softcap) / temperature[:, None, None]
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            sampled = self.draws.sample(probs)
            argmax = torch.argmax(processed, dim=-1)
            entropy = torch.distributions.Categorical(logits=processed).entropy()
            sc = processed.to(embedding.dtype).softmax(dim=-1, dtype=torch.float32).to(embedding.dtype)
            soft = sc @ embedding
            noise = self.draws.noise(active, self.device)
        frozen = None if s.revise_accepted else st["frozen"][:active]
        out = denoise_step(
            canvas,
            sampled,
            argmax,
            entropy,
            noise,
            st["history"][:active],
            entropy_bound=s.entropy_bound,
            confidence_threshold=s.confidence_threshold,
            frozen=frozen,
            backend=self.backend,
        )
        # With the ablation, frozen positions emit their kept token: the one in the new canvas (accepted now
        # or earlier), not the step's input canvas, where a position accepted this step still holds noise.
        emitted = argmax if frozen is None else torch.where(out.frozen, out.canvas, argmax)
        updates = {"canvas": out.canvas, "argmax": emitted, "soft": soft, "history": out.history}
        if frozen is not None:
            updates["frozen"] = out.frozen
        for name, value in updates.items():
            target = st[name][:active]
            if live is None:
                target.copy_(value)
            else:
                shape = (active,) + (1,) * (value.dim() - 1)
                target.copy_(torch.where(live.view(shape), value, target))
        if live is None:
            st["step"][:active] += 1
        else:
            st["step"][:active] += live.long()
        if not s.adaptive_stopping:
            return torch.zeros(active, dtype=torch.bool, device=self.device)
        return out.stable & out.confident

    # ------------------------------------------------------------------------------------- continuous
    def _new_row(self, req: Request, order: int) -> _Row:
        k0, k1 = rng.row_key(self.settings.seed, req.row_id, req.completion)
        prompt = tuple(int(t) for t in req.prompt_ids)
        return _Row(
            request=req,
            k0=k0,
            k1=k1,
            order=order,
            prompt=prompt,
            prompt_key=(len(prompt), hash(prompt)),
            prompt_blocks=prefix_hashes(prompt, PROMPT_PAD),
            drafts=[] if self.settings.record_drafts else None,
        )

    def _refill(self, rows: list[_Row], queue: deque, continuing: list[tuple[_Row, list[int]]]) -> None:
        """Encodes what needs encoding before the next step: the emitted canvases of rows that go on
        (appended to their slots; one call) and the prompts of queued rows taking the free slots (another).
        Apart, because a batch is padded to its widest row: a canvas padded to a long prompt's width would
        cost the prompt's work and could run past its slot's capacity."""
        incoming = [queue.popleft() for _ in range(min(self.max_batch - len(rows), len(queue)))]
        if not continuing and not incoming:
            return
        st, dev = self._state, self.device
        slot_of = {id(r): i for i, r in enumerate(rows)}
        appended = [slot_of[id(r)] for r, _ in continuing]
        admitted = list(range(len(rows), len(rows) + len(incoming)))
        if appended:
            index = torch.tensor(appended, device=dev)
            st["canvas_idx"][index] += 1
        if admitted:
            index = torch.tensor(admitted, device=dev)
            st["k0"][index] = torch.tensor([r.k0 for r in incoming], dtype=torch.long, device=dev)
            st["k1"][index] = torch.tensor([r.k1 for r in incoming], dtype=torch.long, device=dev)
            st["canvas_idx"][index] = 0
            self._cache.lengths[index] = 0
        if appended:
            index = torch.tensor(appended, device=dev)
            prefix = appended == list(range(len(appended)))
            self._encode(
                index, [t for _, t in continuing], prefix=prefix, cached=[r.cached for r, _ in continuing]
            )
        if incoming:
            self._admit(rows, incoming)
        slots = torch.tensor(appended + admitted, device=dev)
        for row, canvas_tokens in continuing:
            row.cached += len(canvas_tokens)
        for row in incoming:
            row.cached = len(row.request.prompt_ids)
        self._start_canvas(slots)
        for row, _ in continuing:
            row.step = 0
        rows.extend(incoming)
        for row in [r for r, _ in continuing] + incoming:
            if row.drafts is not None:
                row.drafts.append([])

    def _admit(self, rows: list[_Row], incoming: list[_Row]) -> None:
        """Writes the prompts of `incoming` rows into slots len(rows), len(rows) + 1, ...: what of a prompt a
        written row's slot holds (the whole prompt, or leading blocks) is copied from it (sharing.py) and only the
        rest is encoded after it. In rounds: a row that would copy more from a row written in this round than
        from one written before waits for the next round (the completions of a prompt that shares a system prompt
        with the others copy it whole from their first completion, not the system prompt from another row)."""
        slot_of = {id(r): i for i, r in enumerate(rows + incoming)}
        pending, rounds = incoming, 0
        while pending:
            rounds += 1
            planned = PromptIndex(PROMPT_PAD)
            fresh: list[_Row] = []
            copies: list[tuple[int, int, int]] = []  # (source slot, slot, tokens copied)
            later: list[_Row] = []
            for row in pending:
                source, shared = self._prompts.source(row) if self.share_prompts else (None, 0)
                if self.share_prompts and rounds < MAX_ADMIT_ROUNDS and planned.source(row)[1] > shared:
                    later.append(row)
                    continue
                if source is None:
                    fresh.append(row)
                else:
                    copies.append((slot_of[id(source)], slot_of[id(row)], shared))
                planned.add(row)
            self._write_prompts([slot_of[id(r)] for r in fresh], copies, rows + incoming)
            if self.share_prompts:
                waiting = {id(r) for r in later}
                for row in pending:
                    if id(row) not in waiting:
                        self._prompts.add(row)
            pending = later

    def _write_prompts(self, fresh: list[int], copies: list[tuple[int, int, int]], rows: list[_Row]) -> None:
        """Encodes the prompts of the `fresh` slots; per copy (source slot, slot, n), copies the first n tokens of
        the source's slot, then encodes the rest of the slot's prompt after them (`rows[slot]` is its row)."""
        if fresh:
            tokens = [list(rows[slot].prompt) for slot in fresh]
            prefix = fresh == list(range(len(fresh)))
            self._encode(torch.tensor(fresh, device=self.device), tokens, prefix=prefix)
        if not copies:
            return
        src, dst, lengths = (torch.tensor(c, device=self.device) for c in zip(*copies, strict=True))
        self._cache.copy_prefix(src, dst, lengths)
        self.stats.prompt_tokens_shared += sum(c[2] for c in copies)
        rest = [(slot, list(rows[slot].prompt[n:]), n) for _, slot, n in copies]
        rest = [r for r in rest if r[1]]
        if not rest:
            return
        # Encoded after their copied tokens, padded to the widest rest: one call when that fits every slot.
        width = round_up(max(len(t) for _, t, _ in rest), PROMPT_PAD)
        groups = [rest] if max(n for _, _, n in rest) + width <= self.capacity else [[r] for r in rest]
        for group in groups:
            slots, tokens, cached = (list(x) for x in zip(*group, strict=True))
            self._encode(torch.tensor(slots, device=self.device), tokens, prefix=False, cached=cached)

    def _finish_canvas(self, row: _Row, emitted: list[int]) -> Result | None:
        """Appends the emitted canvas; returns the row's Result if the row is finished."""
        row.canvas += 1
        cut = next((i for i, t in enumerate(emitted) if t in self.eos), None)
        reason = finish_reason(len(row.tokens), cut, self.settings.max_new_tokens)
        row.tokens.extend(emitted if cut is None else emitted[:cut])
        keep = self.stop(row.tokens[: self.settings.max_new_tokens]) if self.stop is not None else None
        if keep is not None:
            reason = "stop"
        elif cut is None and row.canvas < self.settings.max_canvases:
            return None
        return Result(
            row_id=row.request.row_id,
            token_ids=row.tokens[: self.settings.max_new_tokens if keep is None else keep],
            finish_reason=reason,
            denoising_steps=row.steps_total,
            canvases=row.canvas,
            drafts=row.drafts,
        )

    def _run_continuous(self, feed: Feed, emit: Callable[[_Row, Result], None]) -> None:
        if not self.draws.keyed:
            raise ValueError(
                "random_mode='torch_global' reproduces the reference only with batching='static'"
            )
        self._ensure_storage()
        self._prompts = PromptIndex(PROMPT_PAD)  # the written prompts of this run's rows (_admit)
        queue: deque[_Row] = deque()
        rows: list[_Row] = []  # rows[i] lives in slot i
        max_steps = self.settings.max_denoising_steps
        taken = 0

        def top_up(wait: bool) -> None:  # queue as many rows as there will be free slots
            nonlocal taken
            for req in feed.pull(self.max_batch - len(rows) - len(queue), wait):
                check_prompt(req, self.max_prompt_tokens)
                queue.append(self._new_row(req, taken))
                taken += 1

        top_up(wait=True)
        self._refill(rows, queue, [])
        while rows:
            active = len(rows)
            longest = max(r.cached for r in rows)
            stop = self._denoise(active, longest=longest).tolist()  # the one host synchronisation per step
            drafts = self._state["argmax"][:active].tolist() if self.settings.record_drafts else None
            done = []
            for i, row in enumerate(rows):
                row.step += 1
                row.steps_total += 1
                if drafts is not None:
                    row.drafts[-1].append(drafts[i])
                if stop[i] or row.step >= max_steps:
                    done.append(i)
            if not done:
                if len(rows) < self.max_batch:  # rows that arrived while slots were free join now
                    top_up(wait=False)
                    self._refill(rows, queue, [])
                continue
            emitted = self._state["argmax"][torch.tensor(done, device=self.device)].tolist()
            leaving, continuing = set(), []
            for i, canvas_tokens in zip(done, emitted, strict=True):
                result = self._finish_canvas(rows[i], canvas_tokens)
                if result is None:
                    continuing.append((rows[i], canvas_tokens))
                else:
                    leaving.add(i)
                    self._prompts.remove(rows[i])
                    emit(rows[i], result)
            self._compact(rows, leaving)
            top_up(wait=not rows)
            self._refill(rows, queue, continuing)

    def _compact(self, rows: list[_Row], leaving: set[int]) -> None:
        """Removes leaving rows; the last surviving rows move into the freed slots."""
        if not leaving:
            return
        survivors = [i for i in range(len(rows)) if i not in leaving]
        keep = len(survivors)
        holes = sorted(i for i in leaving if i < keep)
        movers = [i for i in survivors if i >= keep]
        new_rows = list(rows)
        for hole, src in zip(holes, movers, strict=True):
            self._move_slot(src, hole)
            new_rows[hole] = rows[src]
        # Freed slots may be computed as padding rows of a bucketed step: give them an empty, valid state.
        self._cache.lengths[keep : len(rows)] = 0
        self._state["step"][keep : len(rows)] = 0
        rows[:] = new_rows[:keep]
