"""Stand-in for ``prefect.client.schemas.objects`` (see ``flows/no_prefect/prefect/__init__.py``): names used in annotations only."""


class State:
    pass


class TaskRun:
    pass
