"""Output folders: what may be written where (``folder``), and writing a new artefact so that the
folder holds all of it or none of it (``staging``). Used by the merge, ``check``, the search's
``--write-best`` and ``mergekit-expo lora``; imports nothing else of the package."""
