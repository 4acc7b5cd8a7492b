"""Data: the class-incremental stream and the inbox of new data."""
