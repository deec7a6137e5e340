"""Front protocols (gateway/front.py's `Front`): one module per client protocol family."""
