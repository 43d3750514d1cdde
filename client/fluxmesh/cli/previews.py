"""`fluxmesh generate --preview ...`: write each preview to a folder as it arrives."""

from __future__ import annotations

from pathlib import Path

from fluxmesh.client.events import Step


class PreviewWriter:
    """Saves the previews of Step events as `step-NNN[-i].jpg` in `directory` (i: the image in a
    batch of several); `latest` is the last file written."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.latest: Path | None = None
        self.written = 0

    def save(self, step: Step) -> Path | None:
        if not step.preview_data:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        many = len(step.preview_data) > 1
        for i, data in enumerate(step.preview_data):
            path = self.directory / (f"step-{step.preview_step:03d}" + (f"-{i}" if many else "") + ".jpg")
            path.write_bytes(data)
            self.latest = path
            self.written += 1
        return self.latest
