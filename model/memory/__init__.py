"""Memory levels (paper eq. 1) and their experts: the continuum memory, routing, prototypes, merging, the wake's eq.-2 update, and the state on disk."""
