"""The one error type for bad input, so callers tell a user's mistake from a bug in perpcs.

Whatever perpcs reads from a user (data folders, importer sources, predictions, recipes, pools, base
models, run folders) raises `InputError` on bad content, with a message that names the file and,
where there is one, the line or record and the field. The CLI prints it as plain text, no traceback.
"""

import errno
import sqlite3

from safetensors import SafetensorError


class InputError(ValueError):
    """Bad input: the message names the file (and the line/record and field where there is one)."""


# What reading and writing files may fail with besides bad content (a full disk, a read-only folder, a corrupt
# safetensors file or pool manifest): the CLI and the server turn these into messages (`describe`).
FILE_ERRORS = (OSError, SafetensorError, sqlite3.Error)


def describe(e: BaseException) -> str:
    """The message of a failure: an OSError names its file (and says when the disk is full)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}" + (" (the disk is full)" if e.errno == errno.ENOSPC else "")
    if isinstance(e, SafetensorError):
        return f"a safetensors file could not be read or written ({e})" + (
            " (the disk is full)" if "StorageFull" in str(e) else "")
    if isinstance(e, sqlite3.Error):
        return f"a pool manifest could not be read or written ({e})"
    return str(e)
