"""Show a generation's events on the terminal: stage lines, a per-step bar, timings."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxmesh.cli.previews import PreviewWriter
from fluxmesh.client._core import no_result
from fluxmesh.client.events import Event, Queued, Result, StageFinished, StageStarted, Step


def follow(events: Iterable[Event], console: Console | None = None, previews: PreviewWriter | None = None) -> Result:
    """Render events as they arrive and return the final Result; `previews` saves live previews
    (the bar shows the latest one's path)."""
    console = console or Console(stderr=True)
    result = None
    events = iter(events)
    first = next(events, None)  # a call that fails at once fails before the bar draws anything
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        steps = None
        for event in itertools.chain([first] if first is not None else [], events):
            if isinstance(event, Queued):
                console.print(f"queued: position {event.position}")
            elif isinstance(event, StageStarted) and event.stage.value == "denoise":
                steps = progress.add_task("denoise", total=None)
            elif isinstance(event, Step) and steps is not None:
                progress.update(steps, completed=event.step, total=event.total)
                if previews is not None and (path := previews.save(event)) is not None:
                    progress.update(steps, description=f"denoise (preview: {path})")
            elif isinstance(event, StageFinished):
                console.print(f"{event.stage.value}: {event.seconds:.2f}s")
            elif isinstance(event, Result):
                result = event
    if result is None:
        raise no_result()
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    t = result.timings
    console.print(
        f"seed {result.seed}: encode {t.encode:.2f}s, denoise {t.denoise:.2f}s, decode {t.decode:.2f}s, "
        f"total {t.total:.2f}s (queued {t.queued:.2f}s)"
    )
    return result
