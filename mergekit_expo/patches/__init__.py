"""How expo joins the unmodified mergekit: one module per mergekit internal it wraps or reads.

``record``: the record type (where an internal lives, the call made to it, the feature it gives,
which merges need it), the compatibility check and the process-wide losses; ``apply``: installing
a patch after its module has executed; ``reads``: the private functions called, not wrapped.
The others each extend one mergekit module (listed in ``mergekit_expo._startup.AFTER_IMPORT``).
"""
