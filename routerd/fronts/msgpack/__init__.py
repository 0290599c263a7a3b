"""The msgpack Unix-socket front: accept, framing, and one Connection per client."""
