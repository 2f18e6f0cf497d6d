"""Progress bars for the conversion stages (rich, on stderr): stage, current module, count, elapsed, ETA."""

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextmanager
    def stage(self, name: str, total: int):
        """Yields step(module): call it as each module finishes."""
        if not self.enabled:
            yield lambda module: None
            return
        columns = (TextColumn(f"{name:<11}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[module]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with RichProgress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(name, total=total, module="")
            yield lambda module: bar.update(task, advance=1, module=module)
