"""What reading and changing the schema report: the status, each applied step, a run."""

from __future__ import annotations

from dataclasses import dataclass, field

from .history import Attempt
from .revisions import Revision


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    current_version: int
    head: str | None
    head_version: int
    pending: tuple[Revision, ...]

    @property
    def at_head(self) -> bool:
        return not self.pending and self.current == self.head

    @property
    def current_name(self) -> str:
        if self.current is None:
            return "v0"
        numbered = self.current.isdigit()
        return f"v{self.current_version}" + ("" if numbered else f" ({self.current})")


@dataclass(frozen=True)
class AppliedStep:
    revision: Revision
    direction: str
    duration_ms: int
    attempts: int


@dataclass
class MigrationReport:
    from_version: int
    to_version: int
    steps: list[AppliedStep] = field(default_factory=list)
    interrupted: list[Attempt] = field(default_factory=list)
    # applied by another instance while this one waited for a lost lock
    done_elsewhere: list[Revision] = field(default_factory=list)

    @property
    def total_ms(self) -> int:
        return sum(step.duration_ms for step in self.steps)
