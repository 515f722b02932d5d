"""The one error type of the data pipeline.

`data_pipeline` knows nothing of GANs, so it does not borrow the training library's errors: every
bad input it meets (a path, a data spec, a manifest, a writer or reader argument) is a `DataError`.
Whoever runs it as a command (the `rgan` launcher) turns one into a single line on stderr and exit
code 2, exactly like the library's own `UsageError`.
"""


class DataError(Exception):
    """Bad input to the data pipeline. The message is the whole story: one actionable line, printed as
    is (`rgan shards: error: <message>`), never a traceback."""
