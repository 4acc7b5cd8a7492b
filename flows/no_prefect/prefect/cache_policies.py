"""Stand-in for ``prefect.cache_policies`` (see ``flows/no_prefect/prefect/__init__.py``)."""

NO_CACHE = None
