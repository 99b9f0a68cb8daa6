"""The one error type for bad input, so callers tell a user's mistake from a bug in perpcs.

Whatever perpcs reads from a user (data folders, importer sources, predictions, recipes, pools, base
models, run folders) raises `InputError` on bad content, with a message that names the file and,
where there is one, the line or record and the field. The CLI prints it as plain text, no traceback.
"""


class InputError(ValueError):
    """Bad input: the message names the file (and the line/record and field where there is one)."""
