"""What an export wrote, and what it could not carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ExportReport:
    """``path``: the folder (or file) written; ``format``: what it holds; ``dropped``: the activation
    quantization the checkpoint does not carry; ``max_weight_change``: the largest change of any quantized
    weight from the model's own (0.0 when the export is exact)."""

    path: Path
    format: str
    dropped: list[str] = field(default_factory=list)
    max_weight_change: float = 0.0

    def summary(self) -> str:
        exact = "bit-exact weights" if self.max_weight_change == 0 else f"weights within {self.max_weight_change:.3g}"
        dropped = f"; not carried: {', '.join(self.dropped)}" if self.dropped else ""
        return f"exported {self.format} to {self.path} ({exact}{dropped})"
