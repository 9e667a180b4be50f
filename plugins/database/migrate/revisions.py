"""The revisions on disk: an Alembic directory, found from ``[migrations] script_location``.

``script_location`` is a directory (relative to where dbkeeper runs), a package resource
(``package:path``, Alembic's own syntax), empty for dbkeeper's example schema, or ``none`` for
a bot whose schema dbkeeper leaves alone. A directory made by ``alembic init`` works as it is:
its ``env.py`` gets the database URL as ``sqlalchemy.url`` (and dbkeeper's connection, when it
asks for it; see ``alembic_env``).

Versions: revision ``0012`` is v12; revisions with other ids (Alembic's hex ids) are numbered
by their position in the chain, so "v2" always means "the second revision".

Checksums: the sha256 of each revision file is recorded when it is applied, and a file changed
since is reported. A revision rewritten on purpose to the same effect (faster, say) declares
the checksums of the versions it replaces, and databases that applied one of those are not
warned::

    supersedes_checksums = ("51d6394ac7f2f6e6da4ce49edc3024fb143dd0763bccf083fef1ce40559a2a84",)
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from sqlalchemy.engine import URL

from ..errors import MigrationError
from ..settings import EXAMPLE_SCRIPT_LOCATION, NO_MIGRATIONS
from .alembic_import import load_alembic

if TYPE_CHECKING:
    # Alembic (0.1 s to import) only when revisions are read: `backup list` never does.
    from alembic.config import Config
    from alembic.script import Script, ScriptDirectory

# Alembic's Config reads values through configparser interpolation.
_ESCAPE = str.maketrans({"%": "%%"})
SUPERSEDES = "supersedes_checksums"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Revision:
    id: str
    version: int
    description: str
    down_revision: str | None
    path: Path
    checksum: str
    # sha256 of earlier versions of the file that this one replaces to the same effect
    supersedes: tuple[str, ...] = ()

    def accepts(self, checksum: str) -> bool:
        """Whether a database that applied a file with ``checksum`` has this revision's effect."""
        return checksum == self.checksum or checksum in self.supersedes

    @property
    def label(self) -> str:
        return f"{self.id} ({self.description})" if self.description else self.id

    @property
    def numbered(self) -> bool:
        return self.id.isdigit()

    @property
    def name(self) -> str:
        """``v3``, or ``v2 (ae1027a6acf)`` when the id is not the number."""
        return f"v{self.version}" if self.numbered else f"v{self.version} ({self.id})"


def resolve_location(setting: str) -> Path | None:
    """The Alembic directory ``setting`` names; None for ``none`` (no migrations)."""
    value = setting or EXAMPLE_SCRIPT_LOCATION
    if value == NO_MIGRATIONS:
        return None
    path = Path(value)
    if ":" in value and not path.exists():
        package, _, inner = value.partition(":")
        try:
            root = importlib.resources.files(package)
        except (ImportError, TypeError) as error:
            raise MigrationError(
                f"[migrations] script_location = {value!r}: cannot import {package!r} ({error})"
            ) from None
        path = Path(str(root)) / inner if inner else Path(str(root))
    if not (path / "env.py").is_file():
        raise MigrationError(
            f"[migrations] script_location = {value!r}: {path} is not an Alembic directory "
            "(no env.py); create one with `alembic init` or fix the path"
        )
    return path


class Revisions:
    """The revisions of one Alembic directory, oldest first."""

    def __init__(self, location: Path | None) -> None:
        self.location = location
        self._script: ScriptDirectory | None = None
        self._cache: list[Revision] | None = None

    @property
    def managed(self) -> bool:
        """False when dbkeeper migrates nothing (``script_location = "none"``)."""
        return self.location is not None

    def config(
        self,
        *,
        connection: Connection | None = None,
        url: URL | None = None,
        metadata: Any = None,
    ) -> Config:
        """An Alembic ``Config`` for this directory; ``env.py`` finds what it needs in it."""
        load_alembic()
        from alembic.config import Config

        config = Config(stdout=io.StringIO())
        config.set_main_option("script_location", str(self.location).translate(_ESCAPE))
        if url is not None:  # for env.py files made by `alembic init`
            rendered = url.render_as_string(hide_password=False)
            config.set_main_option("sqlalchemy.url", rendered.translate(_ESCAPE))
        config.attributes["target_metadata"] = metadata
        config.attributes["dbkeeper"] = True
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    @property
    def script(self) -> ScriptDirectory:
        if self._script is None:
            load_alembic()
            from alembic.script import ScriptDirectory

            self._script = ScriptDirectory.from_config(self.config())
        return self._script

    def all(self) -> list[Revision]:
        """All revisions, oldest first; one line of them (several heads are refused)."""
        if self.location is None:
            return []
        if self._cache is None:
            heads = self.script.get_heads()
            if len(heads) > 1:
                raise MigrationError(
                    f"the migrations in {self.location} have {len(heads)} heads "
                    f"({', '.join(heads)}); dbkeeper needs one line of revisions. Merge them "
                    "with `alembic merge heads`."
                )
            scripts = list(reversed(list(self.script.walk_revisions("base", "heads"))))
            self._cache = [_revision(script, index) for index, script in enumerate(scripts, 1)]
        return list(self._cache)

    def head(self) -> Revision | None:
        revisions = self.all()
        return revisions[-1] if revisions else None

    def by_id(self) -> dict[str, Revision]:
        return {revision.id: revision for revision in self.all()}

    def version_of(self, revision_id: str | None) -> int:
        """The version of a revision id; 0 for none; its number for an unknown numbered id."""
        if revision_id is None:
            return 0
        known = self.by_id().get(revision_id)
        if known is not None:
            return known.version
        return int(revision_id) if revision_id.isdigit() else 0

    def find(self, spec: str) -> Revision | None:
        """A revision by id ("0002", "ae1027a6acf" or a unique prefix of it), number ("2",
        "v2"), "head", or "base" (None)."""
        if spec in ("base", "0", "v0"):
            return None
        revisions = self.all()
        if spec == "head" and revisions:
            return revisions[-1]
        wanted = spec[1:] if spec[:1] in ("v", "V") and spec[1:].isdigit() else spec
        for revision in revisions:
            if revision.id == wanted:
                return revision
        if wanted.isdigit():
            for revision in revisions:
                if revision.version == int(wanted):
                    return revision
        prefixed = [r for r in revisions if len(wanted) >= 4 and r.id.startswith(wanted)]
        if len(prefixed) == 1:
            return prefixed[0]
        raise MigrationError(
            f"no revision {spec!r} in {self.location}; `dbkeeper db status` lists them"
        )


def _revision(script: Script, position: int) -> Revision:
    path = Path(script.path)
    down = script.down_revision
    if isinstance(down, tuple | list):
        down = down[0] if down else None
    return Revision(
        id=script.revision,
        version=int(script.revision) if script.revision.isdigit() else position,
        description=(script.doc or "").strip().splitlines()[0] if script.doc else "",
        down_revision=down,
        path=path,
        checksum=hashlib.sha256(path.read_bytes()).hexdigest(),
        supersedes=_superseded(script, path),
    )


def _superseded(script: Script, path: Path) -> tuple[str, ...]:
    declared = getattr(script.module, SUPERSEDES, ())
    values = (declared,) if isinstance(declared, str) else declared
    if not isinstance(values, tuple | list) or not all(
        isinstance(value, str) and _SHA256.fullmatch(value.lower()) for value in values
    ):
        raise MigrationError(
            f"{path}: {SUPERSEDES} must be a tuple of sha256 checksums (64 hex digits each, "
            "as `sha256sum` prints them for the earlier file)"
        )
    return tuple(value.lower() for value in values)
