"""The dispatcher: the async layer that runs a request's attempts and waits for capacity."""
