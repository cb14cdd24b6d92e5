"""How to sample a model: the options of one call, and the settings a model directory recommends.

A model directory's config.json may carry a "sampling" section (steps, cfg_scale, method, grid,
and for a few-step student the step counts it was distilled for and the guidance scale built
into it). Every entry point (the Python API, generate, caption, serve, evaluate, export) fills
the options its user did not give from there, through `Recipe.options`; a model that says
nothing is sampled as the paper does (20 Euler steps, CFG 2.0 for text-to-image).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from flowtok_fast import flow
from flowtok_fast.errors import FlowTokWarning, UserError
from flowtok_fast.validate import MAX_STEPS, finite_float, nonneg_int, one_of, positive_int

OPTION_NAMES = ("steps", "cfg_scale", "method", "grid")


@dataclass
class SamplingOptions:
    """Checked when made: steps >= 1, a finite guidance scale, seed >= 0, a known sampler and grid."""

    steps: int = 20
    cfg_scale: float = 2.0
    seed: int = 0
    method: str = "euler"
    grid: str = "reference"

    def __post_init__(self):
        positive_int(self.steps, "steps")
        if self.steps > MAX_STEPS:  # the server's and the CLI's bound: memory and time grow with steps
            raise UserError(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        self.cfg_scale = finite_float(self.cfg_scale, "cfg_scale")
        nonneg_int(self.seed, "seed")
        one_of(self.method, flow.METHODS, "sampler")
        one_of(self.grid, flow.GRIDS, "time grid")

    @classmethod
    def from_kwargs(cls, options: dict) -> "SamplingOptions":
        fields = list(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UserError(f"unknown sampling option(s) {unknown}: expected some of {fields}")
        return cls(**options)


@dataclass(frozen=True)
class Recipe:
    """What a model recommends. `distilled_steps` (students): the step counts it was trained for;
    `guidance`: the CFG scale built into its conditional row (it then runs at cfg_scale 1.0)."""

    steps: int = 20
    cfg_scale: float = 2.0
    method: str = "euler"
    grid: str = "reference"
    distilled_steps: tuple[int, ...] | None = None
    guidance: float | None = None
    how_chosen: str = ""

    def __post_init__(self):
        SamplingOptions(steps=self.steps, cfg_scale=self.cfg_scale, method=self.method, grid=self.grid)
        object.__setattr__(self, "_warned", set())  # (steps, cfg) already warned about; not a field
        if self.distilled_steps is not None:
            steps = tuple(self.distilled_steps)
            if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
                raise UserError(f"distilled_steps {list(steps)!r}: expected a non-empty list of integers >= 1")
            object.__setattr__(self, "distilled_steps", steps)
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)):
            raise UserError(f"guidance {self.guidance!r}: expected a finite number")

    # ------------------------------------------------------------ config.json

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["distilled_steps"] = list(self.distilled_steps) if self.distilled_steps else None
        return {k: v for k, v in d.items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, d, source: str) -> "Recipe":
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise UserError(f"{source}: 'sampling' must be an object with some of {fields}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise UserError(f"{source}: unknown key(s) in 'sampling': {unknown}: expected some of {fields}")
        try:
            return cls(**d)
        except (UserError, TypeError, ValueError) as err:
            raise UserError(f"{source}: 'sampling': {err}") from None

    # ------------------------------------------------------------ use

    @property
    def defaults(self) -> dict:
        """The options a call that gives none uses."""
        return {k: getattr(self, k) for k in OPTION_NAMES}

    def options(self, **given) -> SamplingOptions:
        """SamplingOptions from `given` (seed, steps, cfg_scale, method, grid); an option that is
        missing or None takes this recipe's value. Warns when a student is asked for a step count
        it was not distilled for, or for guidance on top of the guidance built into it."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(OPTION_NAMES) - {"seed"})
        if unknown:
            raise UserError(f"unknown sampling option(s) {unknown}: expected some of {['seed', *OPTION_NAMES]}")
        opts = SamplingOptions(**{**self.defaults, **given})
        key = (opts.steps, opts.cfg_scale)
        if key not in self._warned:  # once per model and setting, not once per batch
            self._warned.add(key)
            for note in self.notes(opts):
                warnings.warn(FlowTokWarning(note), stacklevel=3)
        return opts

    def notes(self, opts: SamplingOptions) -> list[str]:
        """What a user should hear about `opts` for this model: a student asked for a step count it
        was not distilled for, or for guidance on top of the guidance built into it."""
        notes = []
        if self.distilled_steps and opts.steps not in self.distilled_steps:
            notes.append(f"steps={opts.steps}: this few-step student was distilled for steps "
                         f"{', '.join(map(str, self.distilled_steps))} (other counts run, untrained)")
        if self.guidance is not None and opts.cfg_scale != 1.0:
            notes.append(f"cfg_scale={opts.cfg_scale:g}: this student has guidance {self.guidance:g} built in and "
                         "runs at cfg_scale 1.0 (one row per image); another scale adds guidance on top of it")
        return notes

    def describe(self, opts: SamplingOptions) -> str:
        """One line: the options used, and which came from the model."""
        return (f"sampling: {opts.steps} step(s), cfg {opts.cfg_scale:g}, {opts.method}, {opts.grid} grid "
                f"(model's recommendation: {self.steps} / {self.cfg_scale:g} / {self.method} / {self.grid})")


PAPER_T2I = Recipe()  # the paper's sampler: 20 Euler steps, CFG 2.0, the reference time grid
PAPER_I2T = Recipe(cfg_scale=1.0)  # captions: no guidance
