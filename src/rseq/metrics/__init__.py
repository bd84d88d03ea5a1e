"""rseq.metrics: Prometheus metrics for multi-process Python servers, a
drop-in for prometheus_client, on per-CPU shared memory.

Switch the import::

    from rseq.metrics import Counter, Gauge, Histogram, Summary, Info, Enum

and name a shared file with the RSEQ_METRICS environment variable (a name
in /dev/shm, or a path) or ``rseq.metrics.configure(name)`` before the first
metric: every process that inherits it (gunicorn, uWSGI or Celery workers,
multiprocessing pools) shares the metrics, and ``generate_latest()``, the
WSGI and ASGI apps and ``start_http_server()`` in any of them render every
process's values.  Nothing to wipe between runs, no server hook.  Without a
name, metrics are process-local, exactly like prometheus_client's default.

Hot paths are C methods on per-CPU words updated by restartable sequences:
``Counter.inc()`` costs about what a call of ``{}.get(1)`` costs.  See the
README's metrics section for gauge modes, capacity and the exporter command
``python -m rseq metrics serve NAME``.
"""
from ._exposition import (
    CONTENT_TYPE_LATEST,
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_PLAIN,
    Exemplar,
    Metric,
    Sample,
    choose_encoder,
    generate_openmetrics,
    make_asgi_app,
    make_wsgi_app,
    start_http_server,
    start_wsgi_server,
)
from ._metrics import (
    DEFAULT_BUCKETS,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    PrometheusClientCollector,
    StorageCollector,
    Summary,
    configure,
    generate_latest,
    storage,
)
from ._storage import Storage

__all__ = [
    "CONTENT_TYPE_LATEST",
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_PLAIN",
    "CollectorRegistry",
    "Counter",
    "DEFAULT_BUCKETS",
    "Enum",
    "Exemplar",
    "Gauge",
    "Histogram",
    "Info",
    "Metric",
    "PrometheusClientCollector",
    "REGISTRY",
    "Sample",
    "Storage",
    "StorageCollector",
    "Summary",
    "choose_encoder",
    "configure",
    "generate_latest",
    "generate_openmetrics",
    "make_asgi_app",
    "make_wsgi_app",
    "start_http_server",
    "start_wsgi_server",
    "storage",
]
