"""Which checkpoint a network was trained on, for kohya's ``ss_sd_model_name`` / ``ss_sd_model_hash`` metadata.

Whoever loads the model attaches a ``ModelSource`` to the adapter as ``adapter.source`` (the CLI's ``--model``, the
WebUI host with the hash the WebUI already shows); adapters built otherwise have none and the fields are left out.
"""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.formats import safetensors_io

SHORT_HASH_LENGTH = 10  # the WebUI shows a checkpoint's sha256 cut to 10 hex characters ("Model hash")


class ModelSource:
    """A checkpoint file or diffusers folder (``path``) with the hash its host knows, if any (``known_hash``)."""

    def __init__(self, path: str | Path, known_hash: str | None = None):
        self.path = Path(path)
        self.known_hash = known_hash or None
        self._sha256: str | None = None

    @property
    def name(self) -> str:
        """The checkpoint's file (or folder) name, as kohya writes it."""
        return self.path.name

    def sha256(self) -> str | None:
        """sha256 of the checkpoint file, computed once (a folder has none)."""
        if self._sha256 is None and self.path.is_file():
            self._sha256 = safetensors_io.file_sha256(self.path)
        return self._sha256

    def short_hash(self) -> str | None:
        """The hash the WebUI shows: the host's own when given, else the first 10 hex characters of the sha256."""
        if self.known_hash:
            return self.known_hash
        full = self.sha256()
        return full[:SHORT_HASH_LENGTH] if full else None

    def metadata(self) -> dict[str, str]:
        """``ss_sd_model_name``, and ``ss_sd_model_hash`` (+ kohya's full ``ss_new_sd_model_hash``) when known."""
        fields = {"ss_sd_model_name": self.name}
        short = self.short_hash()
        if short:
            fields["ss_sd_model_hash"] = short
        if self._sha256:
            fields["ss_new_sd_model_hash"] = self._sha256
        return fields
