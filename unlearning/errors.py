"""The one exception type that means "the user's input is wrong", not "the code is wrong"."""


class UserError(Exception):
    """A problem with an input (file, spec, parameter). The CLI prints it as one line, exit 2."""
