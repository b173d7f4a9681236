"""The file formats mach_lightning.export writes, and reading each back.

  state_dict    torch.save of the run's config, the input spec and the component's weights; loading
                rebuilds the architecture (mach_lightning must be importable) and reads it with
                weights_only, so it runs no code from the file. The default.
  torchscript   torch.jit.trace of the module: torch.jit.load runs it without mach_lightning.
  torch_export  a torch.export ExportedProgram (.pt2, batch size left free): torch.export.load.

The two traced formats keep the same record, less the weights, as JSON in an extra file (RECORD),
so any of the three files says what input it expects. Only state_dict is read with weights_only:
load a torchscript or torch_export file, which holds a program, from sources you trust.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from mach_lightning.checkpoint_io import load_checkpoint
from mach_lightning.export_input import example_input

FORMATS = ("state_dict", "torchscript", "torch_export")
RECORD = "mach_lightning_export.json"


def write(fmt: str, module: nn.Module, record: dict, path: str | Path) -> None:
    """Save `module` (eval mode) as `fmt`; `record` holds the config and "input" spec."""
    if fmt == "state_dict":
        torch.save(record, path)
        return
    example = example_input(record["input"])
    extra = {RECORD: json.dumps({k: v for k, v in record.items() if k != "state_dict"})}
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(module, example).save(str(path), _extra_files=extra)
        elif fmt == "torch_export":
            batch = {0: torch.export.Dim("batch")}  # any batch size, not the example's
            program = torch.export.export(module, (example,), dynamic_shapes=(batch,))
            with open(path, "wb") as file:  # a path not ending in .pt2 makes torch warn
                torch.export.save(program, file, extra_files=extra)
        else:
            raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")


def saved_format(path: str | Path) -> str:
    """Which of FORMATS the file is, from its archive's layout (state_dict for anything else)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "state_dict"  # load_checkpoint then names what is wrong with it
    if any(name.endswith("/archive_format") for name in names):
        return "torch_export"
    if any("/code/" in name for name in names):
        return "torchscript"
    return "state_dict"


def read(path: str | Path) -> tuple[dict, nn.Module | None]:
    """(record, module): the module is None for state_dict, which the caller rebuilds."""
    fmt = saved_format(path)
    if fmt == "state_dict":
        return load_checkpoint(path), None
    extra = {RECORD: ""}
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    else:  # from an open file, like the save
        with open(path, "rb") as file:
            module = torch.export.load(file, extra_files=extra).module()
    if not extra[RECORD]:
        raise ValueError(f"{path} is not a file written by mach_lightning.export.")
    return json.loads(extra[RECORD]), module
