"""promptcache: an image-generation cache on Redis Streams — the library.

The parts a producer or a process imports: the wire I/O (`streams`, `client`), the request
`pipeline` and what it composes (`optimizer`, `cache`, `semantic`, `flight`, `generators`,
`storage`), and the leaves (`config`, `errors`, `keys`, `logs`, `prompts`). The processes that
read streams live in `consumers`; the operator surface (the `promptcache` command, `up`, the web
process) in `ops`.

    from promptcache.client import submit
"""

__version__ = "0.1.0"
