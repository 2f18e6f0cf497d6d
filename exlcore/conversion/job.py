"""The work folder of one conversion (WORK/job): its settings, how far it got, and what it has made so far.

Every file is written to a temporary name and renamed into place, so a kill at any moment leaves either
the old or the new version; job.json advances only after the files it points to exist. Hidden states are
never stored: a resumed run recomputes them from the calibration rows and the layers already finished,
with the same operations in the same order, so it continues exactly where the killed run was."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from exlcore.errors import ExlError
from exlcore.weights import Weights


OWN = {"job.json", "layers", "calibration.safetensors", "measurement.json"}  # what a job folder holds


def make_writable_folder(folder: Path) -> None:
    """Create `folder` if need be and write a file into it; OSError if either cannot be done."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".write-test"
    probe.write_bytes(b"")
    probe.unlink()


def replace_atomically(path: Path, write) -> None:
    """Call write(tmp_path), then fsync it and rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # some writers create private files; outputs are ordinary files
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    replace_atomically(path, lambda p: p.write_text(json.dumps(data, indent=1)))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        replace_atomically(path, lambda p: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, p))
    except SafetensorError as e:  # its I/O errors (disk full, permissions) are not OSErrors
        raise ExlError(f"{path}: cannot write it ({e}); free some space or choose another folder") from None


class Job:
    def __init__(self, work: Path, settings: dict, restart: bool):
        self.dir = work / "job"
        self.path = self.dir / "job.json"
        try:
            work.mkdir(parents=True, exist_ok=True)
            # Without its state file a job folder is a start that was cut short: nothing in it is trusted.
            if (restart or not self.path.is_file()) and self.dir.exists():
                strays = [p.name for p in self.dir.iterdir() if p.name not in OWN and p.suffix != ".tmp"]
                if strays:
                    raise ExlError(f"{self.dir}: holds files that are not a conversion's ({', '.join(sorted(strays))}); "
                                   "choose another folder with -o")
                shutil.rmtree(self.dir)
            make_writable_folder(self.dir / "layers")
        except OSError as e:
            raise ExlError(f"{work}: cannot write the conversion there ({e.strerror}); choose a writable folder with -o")
        self.state = {"settings": settings, "stage": "measure", "measured": 0, "quantized": 0}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
                old_settings = old["settings"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ExlError(f"{self.path}: not a conversion state file; remove it or rerun with -nr") from None
            if old_settings != settings:
                diff = ", ".join(f"{k}: {old_settings.get(k)!r} there, {v!r} now"
                                 for k, v in settings.items() if old_settings.get(k) != v)
                raise ExlError(f"{work} holds a conversion with other settings ({diff}); rerun with the same "
                               "arguments to resume it, or add -nr to start over")
            self.state = old
        else:
            self.advance()  # before anything else is written into the job folder

    def __getitem__(self, key):
        return self.state[key]

    def advance(self, **changes):
        self.state.update(changes)
        write_json(self.path, self.state)

    def layer_file(self, i: int) -> Path:
        return self.dir / "layers" / f"{i:05d}.safetensors"

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor]):
        write_tensors(self.layer_file(i), tensors)

    def load_layer(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(self.layer_file(i))

    def layers(self) -> Weights:
        """Every finished layer's tensors by full name, each read only when asked for."""
        return Weights(self.dir / "layers")

    def drop_layers(self):
        shutil.rmtree(self.dir / "layers")
