"""Load tests of a running cspine service: a pool of SYNTHETIC studies, Locust run in processes of its own
(``load_tests/locustfile.py``), summaries of its CSV, concurrency sweeps beside Triton's and the gateway's
metrics, and the overload check. Nothing here imports Locust or gevent: they monkey-patch on import."""
