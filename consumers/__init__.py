"""The processes that consume streams: the worker (request and generation stages), the
persister and the janitor, one group-consumer loop they share (`group`), and the wiring that
builds them from Settings (`wiring`)."""
