"""How clients reach the dispatcher: the msgpack socket and the OpenAI/Anthropic HTTP front."""
