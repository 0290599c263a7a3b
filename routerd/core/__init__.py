"""The routing core: synchronous, no I/O. Plans a request, begins and settles its attempts.

README's "Architecture" section draws where it sits; nothing here imports httpx, sockets,
uvicorn, the upstream adapters, the fronts or the wire protocol (tests/test_layout.py).
"""
