"""`flowtok-fast serve`: an HTTP server that batches concurrent requests onto static batch sizes.

    inputs.py      request bodies -> checked jobs (every bad field a 4xx naming it)
    openai_api.py  the OpenAI-shaped POST /v1/images/generations body
    errors.py      the one JSON error format, for our errors and the framework's
    middleware.py  request ids, responses by status, in-flight count; Host / Origin / API-key checks
    engine.py      one batch of jobs -> images / captions, each row from its own seeded noise
    batcher.py     the queue: compatible jobs grouped, an adaptive window, padded to a bucket, one model thread
    metrics.py     Prometheus metrics (prometheus-client)
    page.py        the small web page at GET /
    uploads.py     caption bodies (JSON base64 or multipart) -> image bytes -> pixels, on the worker pool
    app.py         the FastAPI routes; parsing, decoding and PNG encoding on a worker pool
    main.py        the command line (`main(argv) -> int`), the bind check and the SIGTERM drain
"""
