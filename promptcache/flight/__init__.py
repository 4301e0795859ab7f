"""Single flight: one generation for a picture in flight, whoever else asks for it meanwhile.

- `identical`: the same cache key, across workers (a lock in the cache store).
- `similar`: a rewrite that the semantic tier would match, across workers (an announcement of
  the prompt and its embedding while it is generated).
"""
