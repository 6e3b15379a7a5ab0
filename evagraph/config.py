"""Settings shared by the passes, validated once at the entry points."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ConfigError
from .stats import KINDS


@dataclass(frozen=True)
class EvaSettings:
    """What EVA computes; see the README for each field's meaning.

    budget: average rank per target layer (r); the global budget is ``budget * L``.
    rho: each layer may take at most ``round(budget * rho)`` ranks; 1 means uniform ranks.
    tau: cosine similarity at which a component counts as converged.
    alpha: LoRA alpha; the scale is ``alpha / budget`` with ``adjust_scaling_factors``
        (PEFT's default), else ``alpha / rank``.
    whiten: divide each row of A by the square root of its singular value.
    dropout: LoRA dropout probability on the adapter's input.
    max_steps: bound on calibration minibatches (None: until the data runs out).
    min_batches: minibatches a layer must see before it may count as converged.
    targets / exclude: glob patterns on qualified layer names (see ``select_targets``).
    use_label_mask / label_mask_value: rows whose ``labels`` equal the value are left out
        (as PEFT's EvaConfig), where the batch's labels line up with the rows.
    statistic: "exact" (a d x d second moment: the exact PCA of the rows seen), "lowrank" (a
        rank-2k incremental SVD: O(d k) memory) or "auto" (exact for rows up to 8k wide).
    """

    budget: int = 8
    rho: float = 2.0
    tau: float = 0.99
    alpha: float = 8.0
    adjust_scaling_factors: bool = True
    whiten: bool = False
    dropout: float = 0.0
    max_steps: int | None = None
    min_batches: int = 1
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)
    use_label_mask: bool = True
    label_mask_value: int = -100
    statistic: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0:
            raise ConfigError(f"budget must be a positive integer, got {self.budget!r}")
        if not self.rho >= 1:
            raise ConfigError(f"rho must be >= 1, got {self.rho!r}")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"tau must be in (0, 1], got {self.tau!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps!r}")
        if self.statistic not in KINDS:
            raise ConfigError(
                f"statistic must be one of {', '.join(KINDS)}, got {self.statistic!r}"
            )
        if self.min_batches < 1:
            raise ConfigError(f"min_batches must be >= 1, got {self.min_batches!r}")

    @property
    def max_components(self) -> int:
        """k = round(budget * rho): components fitted per decomposition, the per-layer cap."""
        return round(self.budget * self.rho)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        d["exclude"] = list(self.exclude)
        return d
