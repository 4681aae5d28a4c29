"""``mergekit-expo check``: a preflight of an expo config that reads headers, not weights."""
