"""Honest warnings about a document that was read, but not cleanly.

MuPDF opens many damaged PDFs by rebuilding their structure ("repairing"), and renders pages
whose streams are partly broken by skipping what it cannot decode. Either way an answer comes
back, but it may rest on a page with parts missing: the user must hear about it. The warnings are
one line each, name the file and say what it means; the CLI prints them as ``fila: warning: ...``
and every JSON record carries them in ``warnings``.

What MuPDF said is kept as :class:`ReadNotices` (repaired or not, its complaints). A page's own
notices travel with its visual tokens into the token cache: MuPDF complains about a broken stream
only when it renders the page, so a second question answered from cached tokens would otherwise
not know the page was damaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fila_cli.documents.document import Document

# MuPDF warnings quoted in a "partly unreadable" notice, at most (the first ones say the most).
MAX_QUOTED_COMPLAINTS = 2


@dataclass
class ReadNotices:
    """What MuPDF said while reading (part of) a document."""

    repaired: bool = False  # it rebuilt the file's structure
    complaints: list[str] = field(default_factory=list)  # its warnings, in order, without repeats

    def merged(self, *others: ReadNotices) -> ReadNotices:
        """These notices and ``others``'s, complaints in first-heard order."""
        complaints = list(self.complaints)
        for other in others:
            complaints += [line for line in other.complaints if line not in complaints]
        return ReadNotices(self.repaired or any(other.repaired for other in others), complaints)

    def to_json(self) -> dict[str, Any]:
        return {"repaired": self.repaired, "complaints": list(self.complaints)}

    @classmethod
    def from_json(cls, data: Any) -> ReadNotices:
        """The notices ``to_json`` wrote; ValueError for anything else (a damaged cache entry)."""
        if not (isinstance(data, dict) and isinstance(data.get("repaired"), bool) and isinstance(data.get("complaints"), list)
                and all(isinstance(line, str) for line in data["complaints"])):
            raise ValueError(f"not read notices: {data!r:.80}")
        return cls(data["repaired"], list(data["complaints"]))


def document_notices(document: Document) -> ReadNotices:
    """Everything MuPDF said about ``document`` so far (call it after rendering)."""
    return ReadNotices(document.repaired, list(document.warnings))


def page_notices(document: Document, index: int) -> ReadNotices:
    """What MuPDF said while loading, rendering or reading page ``index`` (0-based): the notices
    cached with the page's visual tokens."""
    return ReadNotices(document.repaired, document.page_warnings(index))


def warning_lines(path: str | Path, notices: ReadNotices) -> list[str]:
    """What the user should know about how the document at ``path`` was read; [] for a clean file."""
    if notices.repaired:
        return [f"{path} was damaged and repaired; some content may be missing"]
    if notices.complaints:
        quoted = "; ".join(notices.complaints[:MAX_QUOTED_COMPLAINTS])
        return [f"{path} could not be read entirely (MuPDF: {quoted}); some content may be missing"]
    return []


def document_warnings(document: Document, *pages: ReadNotices) -> list[str]:
    """The warning lines for ``document``, adding the notices of ``pages`` whose tokens came from
    the cache (not rendered in this run).

    Call it after the pages were rendered: MuPDF reports broken streams only when it meets them.
    """
    return warning_lines(document.path, document_notices(document).merged(*pages))
