"""What the command line says about off-site copies (``backup create``, ``backup list
--offsite``, ``db migrate``): shared by the ``backup`` and ``db`` groups."""

from __future__ import annotations

import click

from dbkeeper.texts import size

from ..offsite.uploads import OffsiteCopies, UploadReport, foreign_note


def echo_upload(report: UploadReport | None) -> None:
    """One line on what the upload after a backup did (nothing when off-site copies are off)."""
    if report is None:
        return
    if report.failure is not None:
        click.echo(
            f"warning: {report.failure}. The backup is kept here; the next backup (or the "
            "bot's next start) uploads it.",
            err=True,
        )
        return
    if report.deferred is not None:
        click.echo(f"warning: {report.deferred}; the next upload finishes it", err=True)
        return
    for copy in report.uploaded:
        encrypted = ", age-encrypted" if copy.encrypted else ""
        click.echo(
            f"copied off-site: {copy.object_key} ({size(copy.size_bytes)}{encrypted}), "
            "read back and verified"
        )
    rotated = f", {len(report.rotated)} rotated out" if report.rotated else ""
    foreign = f" ({report.foreign} not uploaded from here, kept)" if report.foreign else ""
    click.echo(f"off-site: {report.copies} copies in {report.where}{rotated}{foreign}")


def list_offsite(offsite: OffsiteCopies) -> None:
    """The copies off-site, newest first, the damaged ones apart, and the last upload.

    ``origin``: ``here`` for the copies this setup uploaded or adopted (rotated), ``unknown``
    for the others (kept, never rotated; a footnote says what to do)."""
    listing = offsite.listing()
    status = offsite.status()
    own = offsite.lineage(status, listing)
    if listing.copies:
        click.echo(
            f"{'name':<36} {'taken (UTC)':<19}  {'reason':<13} {'stored':>9}  {'schema':>6}  "
            f"{'origin':<7}  rows, encryption"
        )
        for copy in listing.copies:
            info = copy.backup
            encryption = "age" if copy.encrypted else "none"
            origin = "here" if copy.name in own else "unknown"
            click.echo(
                f"{info.name:<36} {info.created_at:%Y-%m-%d %H:%M:%S}  {info.reason:<13} "
                f"{size(copy.size_bytes):>9}  {'v' + str(info.schema_version):>6}  "
                f"{origin:<7}  {info.rows:,}, {encryption}"
            )
        count = len(listing.copies)
        click.echo(
            f"{count} cop{'y' if count == 1 else 'ies'}, {size(listing.total_bytes)} in total, "
            f"in {offsite.where}"
        )
        foreign = sum(copy.name not in own for copy in listing.copies)
        if foreign:
            click.echo(f"origin unknown: {foreign_note(foreign)}")
    else:
        click.echo(f"no copies in {offsite.where}")
    for entry in listing.damaged:
        click.echo(f"{'DAMAGED':<10} {entry.name}: {entry.problem}")
    if listing.orphans:
        click.echo(
            f"{len(listing.orphans)} object(s) without a manifest (uploads that did not "
            "complete; removed a day later)"
        )
    if status.failing and status.last_failure_at is not None:
        click.echo(
            f"last failure: {status.last_failure_at:%Y-%m-%d %H:%M:%S} UTC: {status.last_failure}"
        )
