"""The saved-model format: weights as safetensors, everything else as JSON; safe replacement.

A saved model is a folder::

    model.json          what the model is: {"format": "cellvi-model", "format_version": 1,
                        "cellvi_version", "model_class", "init_kwargs", "summary", "history",
                        "train_indices", "validation_indices", "train_settings", "is_trained",
                        "extra"}
    model.safetensors   the module's parameters and buffers (tensors only)
    adata.h5ad          the AnnData, when saved with it

Nothing in it is executable: JSON holds plain values, safetensors holds tensors, so loading a
file never runs code from it (the pickle-based ``model.pt`` of earlier versions is refused).

Writing goes to a hidden temporary folder next to the target, which then takes the target's
place in one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames,
with a moment without a model at the path). An existing target is replaced only when it is a
folder written by cellvi; files cellvi did not write are kept in the new folder (hard links),
and a file, or a folder not written by cellvi, is refused. Temporary folders left by a save
that was killed are removed by the next save to the same place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "read_model_folder", "write_model_folder"]

FORMAT = "cellvi-model"
FORMAT_VERSION = 1
JSON_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
ADATA_FILE = "adata.h5ad"
LEGACY_FILE = "model.pt"
#: The files cellvi writes in a model folder (anything else there is the user's).
OWN_FILES = {JSON_FILE, WEIGHTS_FILE, ADATA_FILE, LEGACY_FILE}
_TMP_TAG = ".cellvi-save-"
_MAX_JSON_BYTES = 1 << 30


def write_model_folder(
    target: str | os.PathLike,
    state: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
    write_files: Callable[[Path], None] | None = None,
    own_files: Iterable[str] = (),
    prefix: str = "",
) -> None:
    """Write a model folder at ``target``: ``model.json``, ``model.safetensors`` and more.

    ``state`` is the JSON part (``format`` and ``format_version`` are added), ``tensors`` the
    weights, ``write_files(folder)`` writes any other file (an AnnData) into the new folder.
    ``own_files`` names further files that the model writes (besides :data:`OWN_FILES`): when
    an old folder is replaced, they are not kept from it as the user's files. ``prefix`` is
    prepended to the file names (several models in one folder: the others' files are kept).

    Raises
    ------
    FileExistsError
        ``target`` exists and ``overwrite`` is False, or it is a file, or a folder that cellvi
        did not write (the message says what is there).
    """
    from safetensors.torch import save_file

    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    _check_prefix(prefix)
    if target.exists() or target.is_symlink():
        _check_replaceable(target, overwrite, prefix)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
        text = json.dumps(header, allow_nan=True)
        (tmp / f"{prefix}{JSON_FILE}").write_text(text)
        weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(weights, str(tmp / f"{prefix}{WEIGHTS_FILE}"), metadata={"format": FORMAT})
        if write_files is not None:
            write_files(tmp)
        if target.is_dir():
            own = {f"{prefix}{name}" for name in OWN_FILES} | set(own_files)
            for item in target.iterdir():  # the user's own files stay
                if item.name not in own and not (tmp / item.name).exists():
                    os.link(item, tmp / item.name)
            _exchange(tmp, target)  # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_model_folder(folder: str | os.PathLike, prefix: str = ""
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read the JSON part and the weights of a model folder, checking what they are.

    ``prefix``: the one the model was saved with.

    Raises
    ------
    FileNotFoundError
        No model folder there.
    ValueError
        A file of another format or version, a damaged or truncated file, or a pickle-based
        ``model.pt`` from before this format (which is never unpickled).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_prefix(prefix)
    folder = Path(folder)
    json_path = folder / f"{prefix}{JSON_FILE}"
    if not json_path.is_file():
        if (folder / f"{prefix}{LEGACY_FILE}").is_file():
            raise ValueError(
                f"{folder / LEGACY_FILE} is a model saved by an earlier cellvi in a pickle-based "
                "format, which can run code when read; cellvi no longer reads it. Train and "
                "save the model again."
            )
        raise FileNotFoundError(f"No saved cellvi model at {folder} (no {prefix}{JSON_FILE}).")
    if json_path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{json_path} is larger than 1 GiB: not a cellvi model file.")
    try:
        state = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_path} is damaged or truncated (not valid JSON: {err}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a cellvi model file.")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has format version {version!r}; this cellvi reads version "
            f"{FORMAT_VERSION}. Use the cellvi that wrote it, or a newer one."
        )
    weights_path = folder / f"{prefix}{WEIGHTS_FILE}"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: the saved model is incomplete.")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path} is damaged or truncated ({err}).") from None
    return state, tensors


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or "/" in prefix or "\\" in prefix or prefix in (".", ".."):
        raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}.")


def _check_replaceable(target: Path, overwrite: bool, prefix: str = "") -> None:
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(
            f"{target} exists and is a file, not a cellvi model folder; choose another path "
            "(cellvi never replaces a file by a folder)."
        )
    own = any(p.name.endswith((JSON_FILE, LEGACY_FILE)) for p in target.iterdir())
    if not own:
        items = sorted(p.name for p in target.iterdir())[:5]
        raise FileExistsError(
            f"{target} exists and was not written by cellvi (it holds {items or 'nothing'}); "
            "choose another path, or remove it yourself."
        )
    mine = [n for n in OWN_FILES if (target / f"{prefix}{n}").exists()]
    if mine and not overwrite:
        raise FileExistsError(f"{target} already holds a model ({prefix}{mine[0]}); pass "
                              "overwrite=True to replace it.")
    folders = [p.name for p in target.iterdir() if p.is_dir() and p.name not in OWN_FILES]
    if folders:
        raise FileExistsError(
            f"{target} holds folders cellvi did not write ({folders[:5]}); cellvi only replaces "
            "its own files. Move them, or choose another path."
        )


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporary folders of saves to ``target`` whose process no longer runs."""
    parent = target.parent if str(target.parent) else Path(".")
    prefix = f".{target.name}{_TMP_TAG}"
    for item in parent.glob(f"{prefix}*"):
        try:
            pid = int(item.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(item, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically where the system can (Linux), else with two renames."""
    libc_name = ctypes.util.find_library("c")
    fn = None
    if libc_name:
        try:
            fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)
        except OSError:
            fn = None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
    # no atomic exchange here: move the old folder aside, the new one in, then swap names back
    aside = a.with_name(a.name + "-old")
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)
