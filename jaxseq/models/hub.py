"""Where a checkpoint's files come from: a local folder, or a model repository on the Hugging Face hub,
whose files ``huggingface_hub`` fetches one at a time, as they are needed, into its cache (as Petals
does: a server fetches the config and the shards of its own blocks, a client those of the embedding
and head). ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` work as they do for transformers.

Example:
    >>> files = CheckpointFiles(checkpoint)
    >>> files.path("config.json").name, files.path("no-such-file.json")
    ('config.json', None)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PathLike = str | os.PathLike
# What the hub accepts as a model id: "name" or "org/name", of letters, digits, "-", "_" and "."
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


class CheckpointFiles:
    """The files of one checkpoint. ``location`` is a local folder, or else a hub model id
    (``org/name``) at ``revision`` (a branch, tag or commit; default ``main``)."""

    def __init__(self, location: PathLike, revision: str | None = None):
        folder = Path(location)
        self.revision = revision
        if folder.is_dir():
            self.folder: Path | None = folder
            self.repo_id: str | None = None
        elif isinstance(location, str) and _REPO_ID.match(location) and "/" in location and not folder.exists():
            self.folder, self.repo_id = None, location
        else:
            raise FileNotFoundError(
                f"checkpoint folder {str(location)!r} does not exist; pass a local folder holding config.json "
                "and model.safetensors (or model-*.safetensors shards with model.safetensors.index.json), "
                "or a Hugging Face hub model id such as 'org/name'"
            )
        if self.folder is not None and revision is not None:
            raise ValueError(f"a revision ({revision!r}) applies to hub model ids, not to the local folder {folder}")

    def __str__(self) -> str:
        if self.repo_id is None:
            return str(self.folder)
        return f"{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def path(self, name: str) -> Path | None:
        """The local path of file ``name`` (fetched into the hub cache first, for a hub id), or None
        when the checkpoint has no such file (or, offline, the cache lacks it)."""
        if self.repo_id is None:
            path = self.folder / name if self.folder is not None else None
            return path if path is not None and path.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, name, revision=self.revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None

    def where(self, name: str) -> str:
        """How messages name file ``name`` of this checkpoint."""
        if self.folder is not None:
            return str(self.folder / name)
        offline = " (HF_HUB_OFFLINE is set: only the hub cache was searched)" if _offline() else ""
        return f"{name} of hub model {self}{offline}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
