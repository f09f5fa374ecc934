"""The Kiln model server (``kiln-serve``), which runs in ``images/server``.

It serves one verified artifact over the Open Inference Protocol (KServe's "V2 inference
protocol", REST) with dynamic batching, an optional LRU output cache, Prometheus metrics on a
separate port, graceful shutdown on SIGTERM and, for canary demonstrations only, fault injection.

Modules: ``settings`` (flags and env), ``protocol`` (request parsing/encoding, pure), ``batcher``,
``cache``, ``metrics``, ``model`` (artifact loading; the only one importing torch), ``app`` (the
aiohttp server) and ``__main__`` (the console script). Importing this package imports neither
torch nor aiohttp.
"""
