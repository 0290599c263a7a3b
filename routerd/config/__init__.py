"""The config file: its schema, loading with every problem named, and secrets resolution."""
