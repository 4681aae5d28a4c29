"""The one base class of mergekit-expo's refusals.

Every refusal (a config it does not understand, an input it cannot read, an output folder it
may not write, a feature the installed mergekit lost, an overflow) is an :class:`ExpoError` whose
message says what is wrong, where, and what to change. ``mergekit-yaml`` and ``mergekit-multi``
print such a message as one block and exit with status 1 (the traceback only with ``-v``); the
Python API raises it. Imports nothing, so every part of the package can use it.
"""


class ExpoError(Exception):
    """A refusal of mergekit-expo; its message is complete without a traceback."""
