"""Floor 0: what every other package may use: atomic writes and file hashes, the error classes, env.json."""
