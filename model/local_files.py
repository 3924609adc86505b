"""Files read from a model or tokenizer folder must lie inside it.

A folder named by `model.path` or `data.tokenizer` (or fetched from the hub) is read by file
name: config.json, the safetensors files, tokenizer.json, tokenizer_config.json,
chat_template.jinja, ... A symbolic link among them could make the trainer open, parse and copy
into an export any file the process can read (`model.safetensors -> /etc/passwd`). So every
file is checked before it is opened: its real path (links resolved) must lie inside the
folder's real path. The one other layout allowed is the Hugging Face hub cache's, whose
snapshot folders hold links into their repo's content store:

    models--org--name/blobs/<hash>
    models--org--name/snapshots/<revision>/config.json -> ../../blobs/<hash>

that is, a folder `<repo>/snapshots/<revision>` whose links resolve to a file directly inside
`<repo>/blobs/`. The folder itself may be reached through a link (the user named it).
Hard links cannot be told from ordinary files and are not checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def checked_file(folder: str | os.PathLike, name: str | os.PathLike) -> Path:
    """`folder / name`, after checking that it does not lead outside `folder` (see the module
    docstring); a ValueError in one line otherwise. A file that does not exist is returned
    as is, for the caller to report as missing."""
    path = Path(folder) / name
    if not os.path.lexists(path):
        return path
    try:
        root, target = Path(folder).resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise ValueError(f"{path}: cannot be resolved ({e})") from None
    if target.is_relative_to(root):
        return path
    if root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs":
        return path  # the Hugging Face hub cache: snapshot links into the repo's blobs/
    raise ValueError(
        f"{path} leads to {target}, outside the folder {folder}; files are read only from "
        "inside the folder (or, in a Hugging Face cache snapshot, from its repo's blobs/): "
        "copy the file into the folder instead of linking to it")


def check_files(folder: str | os.PathLike, names: Iterable[str | os.PathLike]) -> None:
    """`checked_file` for each name."""
    for name in names:
        checked_file(folder, name)
