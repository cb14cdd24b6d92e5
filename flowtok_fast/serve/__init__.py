"""`flowtok-fast serve`: an HTTP server that batches concurrent requests onto static batch sizes.

    inputs.py   request bodies -> checked jobs (every bad field a 4xx naming it)
    engine.py   one batch of jobs -> images / captions, each row from its own seeded noise
    batcher.py  the queue: compatible jobs grouped, padded to a bucket, run in one worker thread
    metrics.py  Prometheus metrics (prometheus-client)
    page.py     the small web page at GET /
    app.py      the FastAPI routes
    main.py     the command line (`main(argv) -> int`) and the SIGTERM drain
"""
