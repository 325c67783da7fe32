"""Settings of the mask-diffusion sampler (LLaDA, Dream): knobs, defaults, validation.

Two algorithms (`algorithm`, by default the model family's own):
  llada  LLaDA's published `generate`: semi-autoregressive blocks, the block's masked count split evenly over
         its steps, Gumbel-max sampling, confidence = probability of the prediction under softmax(logits);
  dream  Dream's `diffusion_generate`: per step, int(masked * (1 - s / t)) positions committed, t and s
         consecutive points of linspace(1, eps, steps + 1), the rest at the last step; predictions sampled
         from softmax(logits / temperature) after top_p / top_k filtering, and confidences read from that
         same distribution; positions drawn in proportion to softmax(confidence / alg_temp) when alg_temp > 0;
         `origin` commits each masked position with probability 1 - s / t. One block by default, as Dream.

Values come, in order of precedence, from the user (`sampler.mask.*`, `sampler.max_new_tokens`,
`sampler.seed`), from the model's generation_config.json (same key names; LLaDA's `gen_length` is read as
max_new_tokens, Dream's `alg` as remasking), and from the algorithm's reference defaults: LLaDA's `generate`
(gen_length 128, steps = gen_length, temperature 0, cfg_scale 0, low_confidence remasking) with the
semi-autoregressive block length of its Instruct examples (32); Dream's `DreamGenerationConfig` (alg origin,
eps 1e-3, temperature 0, no top_p / top_k / alg_temp) with steps = max_new_tokens, the step count of its
examples, and one block. A default block length or step count that does not fit a smaller max_new_tokens
shrinks to it; values given explicitly are validated as given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.sampler.settings import (
    SEED_RANGE,
    SettingsError,
    is_int,
    is_number,
    is_seed,
    read_generation_json,
    special_token_ids,
)

ALGORITHMS = ("llada", "dream")
CONFIDENCE_RULES = ("low_confidence", "margin", "entropy", "random", "origin")
DREAM_RULE_NAMES = {"maskgit_plus": "low_confidence", "topk_margin": "margin"}  # Dream's `alg` names
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
DEFAULTS: dict[str, Any] = {
    "algorithm": None,  # the family's own: llada for LLaDA, dream for Dream
    "max_new_tokens": 128,
    "steps": None,  # = max_new_tokens: one token per step
    "block_length": 32,  # dream: max_new_tokens (one block)
    "remasking": "low_confidence",  # dream: origin
    "temperature": 0.0,
    "cfg_scale": 0.0,
    "threshold": None,
    "remask_threshold": 0.0,
    "cache": "none",
    "eps": 1e-3,
    "alg_temp": 0.0,
    "top_p": None,
    "top_k": None,
}
KNOBS = tuple(DEFAULTS)
DREAM_ONLY = ("eps", "alg_temp", "top_p", "top_k")  # knobs of Dream's algorithm only


class MaskSettingsError(SettingsError):
    """A mask-sampler setting is invalid; the message names the key."""


@dataclass(frozen=True)
class MaskSettings:
    """Everything the mask sampler needs, fully resolved. Picklable.

    algorithm        llada or dream: the transfer schedule and how predictions are drawn (module docstring)
    max_new_tokens   generated tokens per row (LLaDA's gen_length), a multiple of block_length
    steps            denoising steps over all blocks (a multiple of the number of blocks); with `threshold`
                     only the self-correction budget depends on it
    block_length     semi-autoregressive block: blocks are decoded left to right
    remasking        confidence that ranks masked positions: low_confidence (probability of the predicted
                     token; Dream's maskgit_plus), margin (top-1 minus top-2 probability; Dream's topk_margin),
                     entropy (negative entropy), random (a keyed uniform), origin (dream only: no ranking,
                     each masked position is committed with probability 1 - s / t). llada: low_confidence
                     reads softmax(logits) (LLaDA's), margin and entropy softmax(logits / temperature)
                     (Dream's); dream: every rule reads the distribution predictions are drawn from
    temperature      0: argmax; > 0: Gumbel-max sampling of logits / temperature (keyed noise)
    cfg_scale        unsupervised classifier-free guidance: un + (cfg_scale + 1) * (cond - un), where the
                     unconditional row has its prompt masked; 0 disables
    threshold        None: per step the k most confident positions on the linear schedule; a number in (0, 1]:
                     every masked position of the block with confidence >= threshold, at least one (Fast-dLLM)
    remask_threshold 0 disables; > 0: ReMDM-style self-correction: tokens committed earlier in the current
                     block whose probability fell below it are masked again (fewer than committed per step,
                     never in a block's last scheduled step)
    cache            none (exact: the whole sequence every step), prefix (prefix keys/values computed at each
                     block start and reused within the block), dual (prefix and masked suffix reused; only the
                     block is recomputed)
    eps              dream: the last point of the schedule linspace(1, eps, steps_per_block + 1), in [0, 1)
    alg_temp         dream: 0 commits the most confident positions; > 0 draws them without replacement in
                     proportion to softmax(confidence / alg_temp) (keyed Gumbel-top-k)
    top_p, top_k     dream: predictions drawn from the smallest set of tokens whose probability reaches top_p,
                     and from the top_k most likely tokens (None: no filter)
    """

    max_new_tokens: int
    steps: int
    block_length: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    algorithm: str = "llada"
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    threshold: float | None = None
    remask_threshold: float = 0.0
    cache: str = "none"
    eps: float = 1e-3
    alg_temp: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    record_drafts: bool = False

    def __post_init__(self) -> None:
        check_mask_knobs(asdict(self))
        check_combination(asdict(self))
        blocks = self.max_new_tokens // self.block_length
        if self.max_new_tokens % self.block_length:
            raise MaskSettingsError(
                f"sampler.max_new_tokens={self.max_new_tokens} must be a multiple of "
                f"sampler.mask.block_length={self.block_length}"
            )
        if self.steps % blocks:
            raise MaskSettingsError(
                f"sampler.mask.steps={self.steps} must be a multiple of the number of blocks ({blocks} = "
                f"max_new_tokens {self.max_new_tokens} / block_length {self.block_length})"
            )
        if self.remask_threshold > 0 and not self.can_remask:
            raise MaskSettingsError(
                f"sampler.mask.remask_threshold={self.remask_threshold!r} would never mask a token again: a "
                "step remasks fewer tokens than it commits, and only between a block's first and last steps, "
                f"and with steps={self.steps} over blocks of block_length={self.block_length} "
                f"({self.steps_per_block} steps a block) no such step commits more than one token. "
                f"{self._remask_hint()}"
            )

    def _remask_hint(self) -> str:
        """How to make self-correction act (can_remask false). LLaDA's schedule commits two tokens or more
        in a step between a block's first and last exactly when the block has 3 to block_length - 2 steps."""
        blocks, length = self.num_blocks, self.block_length
        unset = "or sampler.mask.threshold, or leave remask_threshold unset"
        if self.algorithm == "llada" and length - 2 >= 3:
            low, high = 3 * blocks, (length - 2) * blocks
            return (
                f"Set sampler.mask.steps to a multiple of {blocks} between {low} and {high} (3 to {length - 2} "
                f"steps a block), {unset}"
            )
        return f"Set fewer sampler.mask.steps or longer blocks, {unset}"

    @property
    def draws_random_numbers(self) -> bool:
        """Whether a step draws keyed random numbers (sampled tokens or positions): if not, the completion is
        a function of the prompt alone, and every completion of a prompt is the same."""
        return self.temperature > 0 or self.remasking in ("random", "origin") or self.alg_temp > 0

    @property
    def can_remask(self) -> bool:
        """Whether self-correction (remask_threshold) can ever act. A step remasks fewer tokens than it
        commits, and only between a block's first and last steps (decide.py): a schedule that commits at most
        one token in each of those steps never remasks (LLaDA's default, steps = max_new_tokens, commits one a
        step). Commits of a threshold or of Dream's `origin` vary from row to row: they can, given such a
        step."""
        if self.threshold is not None or self.remasking == "origin":
            return self.steps_per_block >= 3
        return any(count >= 2 for count in self.commits_per_step()[1:-1])

    def commits_per_step(self) -> list[int]:
        """Tokens a block's schedule commits at each of its steps, without self-correction (decide.py):
        LLaDA's ceil(masked / steps left), or Dream's int(masked * (1 - s / t)) in float32 (all left at the
        last)."""
        steps, masked, counts = self.steps_per_block, self.block_length, []
        if self.algorithm == "dream":
            import torch

            points = torch.linspace(1, self.eps, steps + 1)  # float32, as decide.dream_transfer
            fractions = (1 - points[1:] / points[:-1]).numpy()
        for step in range(steps):
            if step == steps - 1:
                count = masked
            elif self.algorithm == "dream":
                count = int(fractions.dtype.type(masked) * fractions[step])  # a float32 product, truncated
            else:
                count = -(-masked // (steps - step))
            counts.append(count)
            masked -= count
        return counts

    def check_completions(self, completions: int) -> None:
        """MaskSettingsError when `completions` > 1 completions of a prompt would all be the same, or when a
        seed other than the default (0) is set for settings that draw no random numbers: every seed would
        give the completions of seed 0 (a run with another seed, meant as a new sample, a copy)."""
        if completions > 1 and not self.draws_random_numbers:
            raise MaskSettingsError(
                f"sampler.completions_per_prompt={completions} would give {completions} identical completions: "
                f"{self._deterministic()}. {self._sample_hint()}"
            )
        if self.seed != 0 and not self.draws_random_numbers:
            raise MaskSettingsError(
                f"sampler.seed={self.seed} changes nothing: {self._deterministic()}, so every seed gives the "
                f"completions of seed 0. {self._sample_hint()} to sample, or leave sampler.seed unset (0)"
            )

    def _deterministic(self) -> str:
        dream = ", alg_temp 0" if self.algorithm == "dream" else ""
        return f"this mask sampler is deterministic (temperature 0, remasking={self.remasking!r}{dream})"

    @staticmethod
    def _sample_hint() -> str:
        return (
            "Set sampler.mask.temperature > 0 (or remasking=random, or with algorithm=dream remasking=origin "
            "or alg_temp > 0)"
        )

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def to_dict(self) -> dict[str, Any]:
        """The settings as the run records them (manifest, dataset card, config fingerprint). Under LLaDA's
        algorithm, `algorithm` and Dream's knobs, which change nothing there, are left out: the record (and
        the fingerprint, so a resumed run's identity) is the one LLaDA runs had before Dream's algorithm."""
        values = asdict(self)
        if self.algorithm == "llada":
            for key in ("algorithm", *DREAM_ONLY):
                del values[key]
        return values


def check_mask_backend(settings: MaskSettings, backend: str) -> None:
    """MaskSettingsError when sampler.backend=triton would choose no kernel: a mask model's Triton kernels are
    the block caches' attention (pipeline/models/bidirectional.py), and the exact path (cache none) runs torch's
    scaled_dot_product_attention whatever the backend."""
    if backend == "triton" and settings.cache == "none":
        raise MaskSettingsError(
            "sampler.backend='triton' chooses the kernels of the block caches' attention, and with "
            "sampler.mask.cache='none' (the exact path) a mask model runs no Triton kernel: every step is torch's. "
            "Set sampler.mask.cache=prefix or dual to run them, or leave sampler.backend=auto"
        )


def check_mask_knobs(values: Mapping[str, Any], prefix: str = "sampler.mask.") -> None:
    """Checks the knobs present (not None) in `values`."""

    def bad(key: str, why: str, name: str | None = None) -> MaskSettingsError:
        return MaskSettingsError(f"{name or prefix + key}={values[key]!r} {why}")

    def given(key: str) -> bool:
        return values.get(key) is not None

    if given("max_new_tokens") and (not is_int(values["max_new_tokens"]) or values["max_new_tokens"] <= 0):
        raise bad("max_new_tokens", "must be a positive integer", "sampler.max_new_tokens")
    if given("seed") and not is_seed(values["seed"]):  # the same check as the DiffusionGemma sampler's
        raise bad("seed", SEED_RANGE, "sampler.seed")
    if given("record_drafts") and not isinstance(values["record_drafts"], bool):  # "no" would be truthy
        raise bad("record_drafts", "must be true or false", "sampler.record_drafts")
    for key in ("steps", "block_length"):
        if given(key) and (not is_int(values[key]) or values[key] <= 0):
            raise bad(key, "must be a positive integer")
    if given("algorithm") and values["algorithm"] not in ALGORITHMS:
        raise bad("algorithm", f"is not one of {', '.join(ALGORITHMS)}")
    if given("remasking") and values["remasking"] not in (*CONFIDENCE_RULES, *DREAM_RULE_NAMES):
        raise bad(
            "remasking",
            f"is not one of {', '.join(CONFIDENCE_RULES)} (or Dream's {', '.join(DREAM_RULE_NAMES)})",
        )
    if given("cache") and values["cache"] not in CACHE_MODES:
        raise bad("cache", f"is not one of {', '.join(CACHE_MODES)}")
    for key in ("temperature", "cfg_scale", "remask_threshold"):
        if given(key) and (not is_number(values[key]) or values[key] < 0):
            raise bad(key, "must be a number >= 0")
    if given("remask_threshold") and values["remask_threshold"] > 1:
        raise bad("remask_threshold", "is a probability: it must be in [0, 1]")
    if given("threshold") and (not is_number(values["threshold"]) or not 0 < values["threshold"] <= 1):
        raise bad("threshold", "must be a number in (0, 1] (or null for the step schedule)")
    if given("eps") and (not is_number(values["eps"]) or not 0 <= values["eps"] < 1):
        raise bad("eps", "must be a number in [0, 1): the schedule runs from 1 down to eps")
    if given("alg_temp") and (not is_number(values["alg_temp"]) or values["alg_temp"] < 0):
        raise bad("alg_temp", "must be a number >= 0 (0: the most confident positions)")
    if given("top_p") and (not is_number(values["top_p"]) or not 0 < values["top_p"] <= 1):
        raise bad("top_p", "must be a number in (0, 1] (or null: no nucleus filter)")
    if given("top_k") and (not is_int(values["top_k"]) or values["top_k"] <= 0):
        raise bad("top_k", "must be a positive integer (or null: no top-k filter)")


def check_combination(values: Mapping[str, Any], prefix: str = "sampler.mask.") -> None:
    """Knobs that are valid alone but not together, for resolved values (`algorithm` set)."""
    rule, algorithm = values["remasking"], values["algorithm"]
    if rule not in CONFIDENCE_RULES:
        raise MaskSettingsError(f"{prefix}remasking={rule!r} is not one of {', '.join(CONFIDENCE_RULES)}")
    if algorithm == "llada":
        if rule == "origin":
            raise MaskSettingsError(
                f"{prefix}remasking='origin' is Dream's algorithm: set {prefix}algorithm=dream to use it"
            )
        for key in DREAM_ONLY:
            if key != "eps" and values.get(key) not in (None, 0, 0.0):
                raise MaskSettingsError(
                    f"{prefix}{key}={values[key]!r} is a setting of Dream's algorithm: set "
                    f"{prefix}algorithm=dream to use it"
                )
    if values.get("threshold") is not None:
        if rule == "entropy":
            raise MaskSettingsError(
                f"{prefix}threshold={values['threshold']!r} is a confidence in (0, 1], and "
                f"{prefix}remasking='entropy' scores positions by negative entropy (<= 0), which never reaches "
                "it (one token a step): with a threshold use remasking=low_confidence (Dream's maskgit_plus) or "
                "margin"
            )
        if rule == "origin":
            raise MaskSettingsError(
                f"{prefix}threshold={values['threshold']!r} ranks positions by confidence, which "
                f"{prefix}remasking='origin' has none of: use another rule or threshold=null"
            )
        if values.get("alg_temp"):
            raise MaskSettingsError(
                f"{prefix}threshold={values['threshold']!r} and {prefix}alg_temp={values['alg_temp']!r} both "
                "choose the positions to commit: set one of them"
            )


def read_mask_generation_config(model_dir: str) -> dict[str, Any]:
    """Mask knobs and special tokens of `<model_dir>/generation_config.json` ({} when there is none)."""
    try:
        raw = read_generation_json(model_dir)
    except SettingsError as e:
        raise MaskSettingsError(str(e)) from None
    out = {k: raw[k] for k in KNOBS if raw.get(k) is not None}
    if raw.get("gen_length") is not None and "max_new_tokens" not in out:
        out["max_new_tokens"] = raw["gen_length"]
    if raw.get("alg") is not None and "remasking" not in out:  # Dream's DreamGenerationConfig name
        if raw["alg"] not in DREAM_ALGS:
            raise MaskSettingsError(
                f"{model_dir}/generation_config.json: alg={raw['alg']!r} is not one of Dream's "
                f"{', '.join(DREAM_ALGS)}"
            )
        out["remasking"] = raw["alg"]
    try:
        out.update(special_token_ids(raw))
    except SettingsError as e:
        raise MaskSettingsError(f"{model_dir}/generation_config.json: {e}") from None
    return out


# Knobs of the DiffusionGemma sampler that mean nothing to a mask-diffusion model.
DIFFUSION_GEMMA_ONLY = (
    "max_denoising_steps",
    "t_min",
    "t_max",
    "entropy_bound",
    "stability_threshold",
    "confidence_threshold",
    "canvas_length",
)
DIFFUSION_GEMMA_SWITCHES = ("adaptive_stopping", "revise_accepted")  # true by default; false is a choice


def mask_user_values(sampler: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The mask sampler's user values from the job's sampler knobs (`mask` nested, plus max_new_tokens, seed,
    record_drafts); a DiffusionGemma-only knob that is set is an error naming it."""
    set_elsewhere = [k for k in DIFFUSION_GEMMA_ONLY if sampler.get(k) is not None]
    # on by default: anything else (false, or a value that is not a bool) is a choice made for another family
    set_elsewhere += [k for k in DIFFUSION_GEMMA_SWITCHES if sampler.get(k) not in (None, True)]
    if set_elsewhere:
        raise MaskSettingsError(
            f"sampler.{set_elsewhere[0]}={sampler[set_elsewhere[0]]!r} is a DiffusionGemma setting; a {family} "
            "model is sampled with sampler.mask.* (steps, block_length, remasking, threshold, cache, ...)"
        )
    values = {k: v for k, v in (sampler.get("mask") or {}).items() if v is not None}
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise MaskSettingsError(
            f"sampler.mask.{unknown[0]} is not a mask-sampler setting ({', '.join(KNOBS)})"
        )
    for key in ("max_new_tokens", "seed", "record_drafts"):
        if sampler.get(key) is not None:
            values[key] = sampler[key]
    return values


def resolve_mask_settings(
    user: Mapping[str, Any],
    generation_config: Mapping[str, Any],
    *,
    family: str,
    mask_token_id: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
) -> MaskSettings:
    """User values (None = unset) over the model's generation config over the defaults of the algorithm (by
    default the one of `family`, llada or dream; module docstring). Under llada, the generation config's
    Dream-only knobs (a Dream checkpoint's top_p, alg origin, ...) are not applied; the user's are refused."""
    check_mask_knobs(user)
    check_mask_knobs(generation_config, prefix="generation_config.json: ")
    algorithm = user.get("algorithm") or generation_config.get("algorithm") or family
    if algorithm not in ALGORITHMS:
        raise MaskSettingsError(
            f"model family {family!r} has no mask-sampler algorithm; set sampler.mask.algorithm to one of "
            f"{', '.join(ALGORITHMS)}"
        )
    config = dict(generation_config)
    if algorithm == "llada":
        stray = [key for key in DREAM_ONLY if user.get(key) is not None]
        if stray:
            raise MaskSettingsError(
                f"sampler.mask.{stray[0]}={user[stray[0]]!r} is a setting of Dream's algorithm: set "
                "sampler.mask.algorithm=dream to use it"
            )
        for key in DREAM_ONLY:
            config.pop(key, None)
        if config.get("remasking") == "origin":
            del config["remasking"]
    values: dict[str, Any] = {"algorithm": algorithm}
    explicit: set[str] = set()
    for key in (k for k in KNOBS if k != "algorithm"):
        for source in (user, config):
            if source.get(key) is not None:
                values[key] = source[key]
                explicit.add(key)
                break
        else:
            values[key] = DEFAULTS[key]
    length = values["max_new_tokens"]
    if algorithm == "dream":
        values["block_length"] = values["block_length"] if "block_length" in explicit else length
        values["remasking"] = values["remasking"] if "remasking" in explicit else "origin"
    if "block_length" not in explicit:
        values["block_length"] = min(values["block_length"], length)
    if values["steps"] is None:
        values["steps"] = length
    values["remasking"] = DREAM_RULE_NAMES.get(values["remasking"], values["remasking"])
    for key in ("temperature", "cfg_scale", "remask_threshold", "eps", "alg_temp"):
        values[key] = float(values[key])
    if values["top_p"] is not None:
        values["top_p"] = float(values["top_p"])
    try:
        return MaskSettings(
            **values,
            mask_token_id=mask_token_id,
            eos_token_ids=tuple(generation_config.get("eos_token_ids", eos_token_ids)),
            pad_token_id=int(generation_config.get("pad_token_id", pad_token_id)),
            seed=int(user.get("seed") or 0),
            record_drafts=user.get("record_drafts") or False,
        )
    except MaskSettingsError as e:  # a value the user did not set: say where it came from
        taken = [k for k in KNOBS if k in explicit and user.get(k) is None and re.search(rf"\b{k}\b", str(e))]
        if not taken:
            raise
        named = ", ".join(f"{k}={values[k]!r}" for k in taken)
        keys = " / ".join(
            f"sampler.mask.{k}" if k != "max_new_tokens" else "sampler.max_new_tokens" for k in taken
        )
        raise MaskSettingsError(
            f"{e}; {named} {'comes' if len(taken) == 1 else 'come'} from the model's generation_config.json: "
            f"set {keys} to override"
        ) from None
